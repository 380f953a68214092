"""Random decode batches laid out like SGLang's pools, shared by the kernel tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_rabitq.reference import encode_keys, random_rotation


@dataclass
class Batch:
    q: torch.Tensor  # [B, Hq, D]
    k_buf: torch.Tensor  # [slots, Hkv, D]
    v_buf: torch.Tensor
    codes: torch.Tensor  # [slots, Hkv, bits * D/32]
    factor: torch.Tensor  # [slots, Hkv]
    rot: torch.Tensor  # [Hkv, D, D]
    req_to_token: torch.Tensor  # [R, C] int32
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    encoded_lens: torch.Tensor  # [B]
    center: torch.Tensor  # [Hkv, D] float32: the keys' centre the codes were encoded with


def make_batch(lens, hq, hkv, d, device, dtype=torch.bfloat16, encoded=None, peaked=True, seed=0, centred=False,
               key_bits=1) -> Batch:
    """``centred``: codes of the keys minus a random centre (as ``--rabitq-center calibrate``); else zero.
    ``key_bits``: bits per dimension of the codes."""
    gen = torch.Generator().manual_seed(seed)
    pool = sum(lens) + 16
    k = torch.randn(pool, hkv, d, generator=gen)
    v = torch.randn(pool, hkv, d, generator=gen)
    q = torch.randn(len(lens), hq, d, generator=gen)
    if peaked:  # real attention is peaked: give every query head a few strongly aligned keys
        for b in range(len(lens)):
            for qh in range(hq):
                idx = torch.randint(1, pool, (4,), generator=gen)
                k[idx, qh // (hq // hkv)] += q[b, qh]
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    req_to_token = torch.zeros(len(lens) + 3, max(lens) + 8, dtype=torch.int32)
    perm = torch.randperm(pool - 1, generator=gen) + 1  # slot 0 is SGLang's padding slot
    off = 0
    rpi = torch.arange(len(lens)) + 2
    for i, n in enumerate(lens):
        req_to_token[rpi[i], :n] = perm[off : off + n].to(torch.int32)
        off += n
    rot = random_rotation(d, seed=seed, num_heads=hkv)
    center = torch.randn(hkv, d, generator=gen) * 0.5 if centred else torch.zeros(hkv, d)
    codes, factor = encode_keys(k.float(), rot, center, bits=key_bits)
    seq = torch.tensor(lens)
    enc = torch.tensor(encoded) if encoded is not None else seq.clone()
    to = dict(device=device)
    return Batch(q.to(**to), k.to(**to), v.to(**to), codes.to(**to), factor.to(**to), rot.to(**to),
                 req_to_token.to(**to), rpi.to(**to), seq.to(**to), enc.to(**to), center.to(**to))
