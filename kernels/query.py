"""Fused query rotation + INT4 quantization per (request, query head) (reference: ``quantize_query``
and ``query_planes``): the estimate kernels read the 4 bit-planes of the INT4 query."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prepare_query_kernel(
    q_ptr, rot_ptr, qscal_ptr, qbits_ptr, seed_ptr, stride_qb, stride_qh,
    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, RANDOM: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_d).to(tl.float32)
    rot = tl.load(rot_ptr + (hq // GROUP) * D * D + offs_d[:, None] * D + offs_d[None, :])
    rq = tl.sum(q[:, None] * rot, axis=0)  # q @ P, as for the keys
    qmin = tl.min(rq, axis=0)
    delta = (tl.max(rq, axis=0) - qmin) / 15.0
    scaled = (rq - qmin) / tl.where(delta > 0, delta, 1.0)
    if RANDOM:
        # a fresh draw every step: the seed lives in device memory and is bumped by the planner
        offs = (b * HQ + hq) * D + offs_d
        qu = tl.floor(scaled + tl.rand(tl.load(seed_ptr), offs))
    else:
        qu = tl.floor(scaled + 0.5)
    qu = tl.minimum(tl.maximum(qu, 0.0), 15.0)
    row = b * HQ + hq
    tl.store(qscal_ptr + row * 3 + 0, delta)
    tl.store(qscal_ptr + row * 3 + 1, qmin)
    tl.store(qscal_ptr + row * 3 + 2, tl.sum(qu, axis=0))
    # bit-planes, packed like the codes (bit d -> word d // 32, position d % 32; the sum is an OR)
    WORDS: tl.constexpr = D // 32
    qi = tl.reshape(qu.to(tl.int32), (WORDS, 32))
    offs_w = tl.arange(0, WORDS)
    for j in tl.static_range(4):
        words = tl.sum(((qi >> j) & 1) << tl.arange(0, 32)[None, :], axis=1)
        tl.store(qbits_ptr + (row * 4 + j) * WORDS + offs_w, words)


def prepare_query(
    q: torch.Tensor, rot: torch.Tensor, qscal: torch.Tensor, qbits: torch.Tensor,
    seed: torch.Tensor | None = None, rounding: str = "nearest",
) -> None:
    """``q [B, Hq, D]`` -> ``qscal [B, Hq, 3]`` = (delta, min, sum(q_u)) and the INT4 query ``q_u`` as
    its bit-planes ``qbits [B, Hq, 4, D // 32] int32`` (``query_planes``)."""
    b, hq, d = q.shape
    random = rounding == "random"
    if random and seed is None:
        raise ValueError("randomized rounding needs a device seed tensor")
    _prepare_query_kernel[(b, hq)](
        q, rot, qscal, qbits, seed if random else qscal, q.stride(0), q.stride(1),
        HQ=hq, GROUP=hq // rot.shape[0], D=d, RANDOM=random,
    )
