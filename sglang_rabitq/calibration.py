"""``--rabitq-center calibrate``: the key mean per (layer, kv-head) over the first prefill tokens.

Codes must stay radix-shareable, so the centre is fixed once for the server's lifetime. Until enough
prefill keys were seen (``calibrate_tokens``; a server's first prefill is often a short warm-up), codes
are encoded around zero; when the mean is fixed, every valid code of the layer is encoded again
around it, so no code of an older centre is ever scored against a query of the new one.
"""

from __future__ import annotations

import logging

import torch

from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.kernels import encode_slots

logger = logging.getLogger("sglang_rabitq")


class CenterCalibration:
    def __init__(self, pool: CodePool, tokens: int):
        self.pool, self.target = pool, tokens
        self.sums = {lid: torch.zeros(pool.num_kv_heads, pool.head_dim, dtype=torch.float64, device=pool.center.device)
                     for lid in pool.sparse_layers}
        self.seen = 0  # tokens summed into every sparse layer so far
        self._valid_slots = None  # slots to re-encode, in the batch that fixes the centre

    @property
    def done(self) -> bool:
        return self.pool.calibrated

    def observe(self, layer_id: int, keys: torch.Tensor, k_buf: torch.Tensor) -> None:
        """Add an extend batch's new keys ``[n, H, D]`` of one sparse layer; fix the layer's centre (and
        re-encode its valid codes) once ``calibrate_tokens`` keys were seen."""
        self.sums[layer_id] += keys.double().sum(0)
        n = self.seen + keys.shape[0]
        if n >= self.target:
            pool = self.pool
            pool.center[layer_id] = (self.sums[layer_id] / n).float()
            if self._valid_slots is None:  # the same slots for every layer of this batch: found once
                self._valid_slots = torch.nonzero(pool.valid[:-1]).squeeze(1)  # the last entry is the dump slot
            encode_slots(k_buf, self._valid_slots, pool.rot[layer_id], pool.center[layer_id],
                         pool.codes[layer_id], pool.factor[layer_id])
        if layer_id == self.pool.sparse_layers[-1]:
            self.seen = n
            self.pool.calibrated = n >= self.target
            if self.pool.calibrated:  # once per server: what its codes (and so its outputs) depend on
                logger.info("rabitq: key centre fixed over the first %d prefill tokens; %d codes re-encoded "
                            "around it", n, self._valid_slots.numel())
