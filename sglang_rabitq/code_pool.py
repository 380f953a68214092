"""Side buffers beside SGLang's KV pool: RaBitQ codes per KV-pool slot, their validity, and how far
each request's codes reach.

Codes are indexed by slot, like K and V, so a prefix that the radix tree shares across requests
and turns shares its codes too. A slot's code is valid once its key has been encoded for every
sparse layer; a slot handed to a new token is marked invalid until it is encoded again.
"""

from __future__ import annotations

import torch

from sglang_rabitq.config import RaBitQConfig
from sglang_rabitq.kernels.encode import code_buffers
from sglang_rabitq.reference.codes import random_rotation


def code_bytes_per_token(num_sparse_layers: int, num_kv_heads: int, head_dim: int, key_bits: int = 1) -> int:
    """Bytes the index adds per KV-pool slot: ``key_bits * D/8`` code bytes + a float32 factor per
    (layer, kv-head), plus one validity byte."""
    return num_sparse_layers * num_kv_heads * (key_bits * head_dim // 8 + 4) + 1


def layer_rotations(head_dim: int, seed: int, layer: int, kv_heads: range) -> torch.Tensor:
    """``[len(kv_heads), D, D]``: the rotations of a global layer's kv-heads (global indices), one seed
    per (layer, kv-head), so a model's codes do not depend on the tensor-parallel degree."""
    return torch.stack([
        random_rotation(head_dim, seed=(seed * 1_000_003 + layer) * 4099 + h)[0] for h in kv_heads
    ])


class CodePool:
    def __init__(
        self,
        config: RaBitQConfig,
        num_slots: int,
        num_req_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device,
        kv_head_offset: int = 0,
    ):
        """``num_slots`` = KV-pool slots (size + page); ``num_req_slots`` = req_to_token rows.

        ``kv_head_offset`` = this tensor-parallel rank's first global kv-head: rotations are drawn
        per global (layer, kv-head), so a model's codes do not depend on the TP degree.
        """
        config = self.config = config.for_head_dim(head_dim)
        self.num_layers = num_layers
        self.sparse_layers = list(range(min(config.dense_layers, num_layers), num_layers))
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        words = head_dim // 32
        sparse = len(self.sparse_layers)
        # one tensor over the sparse layers each (a forward batch's new keys are encoded for all of them
        # in one launch: ``encode_slots_all_layers``), and per-layer views of them
        # [sparse layers, slots, kv-heads, ...], stored kv-head-major (code_buffers)
        self.stacked_codes, self.stacked_factor = code_buffers(num_slots, num_kv_heads, head_dim, device, sparse,
                                                               config.key_bits)
        self.stacked_rot = torch.zeros(sparse, num_kv_heads, head_dim, head_dim, dtype=torch.float32, device=device)
        for i, layer in enumerate(self.sparse_layers):
            self.stacked_rot[i] = layer_rotations(head_dim, config.seed, layer,
                                                  range(kv_head_offset, kv_head_offset + num_kv_heads))
        self.codes = dict(zip(self.sparse_layers, self.stacked_codes))
        self.factor = dict(zip(self.sparse_layers, self.stacked_factor))
        self.rot = dict(zip(self.sparse_layers, self.stacked_rot))
        # what a dense layer's launch gets in place of codes: never read (the kernels skip scoring)
        self._placeholders = (
            torch.zeros(1, num_kv_heads, config.key_bits * words, dtype=torch.int32, device=device),
            torch.zeros(1, num_kv_heads, dtype=torch.float32, device=device),
            torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float32, device=device),
        )
        self.center = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float32, device=device)
        self.calibrated = config.center == "none"
        # one extra entry each: padded rows of a CUDA-graph batch write there instead of a live one
        self.valid = torch.zeros(num_slots + 1, dtype=torch.bool, device=device)
        self.encoded_len = torch.zeros(num_req_slots + 1, dtype=torch.int32, device=device)
        self.dump_slot, self.dump_req = num_slots, num_req_slots

    def nbytes(self) -> int:
        tensors = [self.stacked_codes, self.stacked_factor, self.stacked_rot, self.center, self.valid, self.encoded_len]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def sparse_center(self) -> torch.Tensor:
        """``[sparse layers, H, D]``: the centres of the sparse layers (a contiguous run of the model's)."""
        first = self.sparse_layers[0] if self.sparse_layers else self.num_layers
        return self.center[first:]

    def is_sparse(self, layer_id: int) -> bool:
        return layer_id in self.codes

    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, factor, rotation) of a sparse layer; placeholders for a dense one."""
        if layer_id in self.codes:
            return self.codes[layer_id], self.factor[layer_id], self.rot[layer_id]
        return self._placeholders
