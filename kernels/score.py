"""Score pass: per chunk of a request's scored region and query head, the estimated logits' max
and a histogram of token counts per bin (reference: ``hist_threshold``'s per-row statistics).

Bins have width ``BIN_WIDTH`` on an absolute grid counted down from the chunk's top bin
``floor(max / BIN_WIDTH)``, so chunks combine by shifting. Two passes over the chunk's codes
(the second mostly from L2): the max first, so every token lands in its final bin at once.
No full-precision K is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import block_logits, chunk_bounds, group_pad, load_group_query
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS

NO_BIN = tl.constexpr(-(2**30))  # top bin of a chunk with no tokens
SCORE_BLOCK_N = 128  # tokens per inner block of the score pass


@triton.jit
def _block(codes_ptr, factor_ptr, r2t_ptr, rpi, n0, end, hkv, stride_cn, stride_ch, stride_fn, stride_r2t,
           qu, delta, qmin, qsum, sm_scale, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions ``[n0, n0 + BLOCK_N)`` of request row ``rpi``: which are ``< end``, and their logits."""
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < end
    slots = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0).to(tl.int64)
    lg = block_logits(codes_ptr, factor_ptr, slots, valid, hkv, stride_cn, stride_ch, stride_fn,
                      qu, delta, qmin, qsum, sm_scale, D, BLOCK_N)
    return valid, lg


@triton.jit
def _score_kernel(
    qu_ptr, qscal_ptr, codes_ptr, factor_ptr, r2t_ptr, plan_ptr,
    cmax_ptr, ctop_ptr, ccount_ptr,
    sm_scale, stride_cn, stride_ch, stride_fn, stride_r2t, HQ, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    NB: tl.constexpr, BIN_W: tl.constexpr, PLAN_FIELDS: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    c = tl.program_id(2)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GROUP
    out_rows = (b * HQ + hkv * GROUP + offs_g) * NC + c
    start, end = chunk_bounds(plan_ptr, b, c, PLAN_FIELDS)
    rpi = tl.load(plan_ptr + b * PLAN_FIELDS + 0).to(tl.int64)
    qu, delta, qmin, qsum = load_group_query(qu_ptr, qscal_ptr, b, hkv, HQ, GROUP, GP, D)
    m = tl.full((GP,), float("-inf"), tl.float32)  # stays -inf for an empty chunk: skipped later
    for n0 in range(start, end, BLOCK_N):
        valid, lg = _block(codes_ptr, factor_ptr, r2t_ptr, rpi, n0, end, hkv, stride_cn, stride_ch, stride_fn,
                           stride_r2t, qu, delta, qmin, qsum, sm_scale, D, BLOCK_N)
        m = tl.maximum(m, tl.max(lg, axis=1))
    top = tl.where(m > float("-inf"), tl.floor(m / BIN_W), 0.0).to(tl.int32)
    offs_j = tl.arange(0, NB)
    count = tl.zeros((GP, NB), tl.int32)
    for n0 in range(start, end, BLOCK_N):
        valid, lg = _block(codes_ptr, factor_ptr, r2t_ptr, rpi, n0, end, hkv, stride_cn, stride_ch, stride_fn,
                           stride_r2t, qu, delta, qmin, qsum, sm_scale, D, BLOCK_N)
        lg = tl.where(valid[None, :], lg, 0.0)
        k = top[:, None] - tl.floor(lg / BIN_W).to(tl.int32)  # bin counted down from the top
        inside = valid[None, :] & (k >= 0) & (k < NB)
        for g in tl.static_range(GROUP):
            row = offs_g[:, None] == g
            kg = tl.sum(tl.where(row, k, 0), axis=0)
            ig = tl.max(tl.where(row, inside.to(tl.int32), 0), axis=0) > 0
            hist = tl.histogram(kg, NB, mask=ig)
            count += tl.where(row, hist[None, :], 0)
    tl.store(cmax_ptr + out_rows, m, mask=gmask)
    tl.store(ctop_ptr + out_rows, tl.where(m > float("-inf"), top, NO_BIN), mask=gmask)
    hist_mask = gmask[:, None] & (end > start)
    tl.store(ccount_ptr + out_rows[:, None] * NB + offs_j[None, :], count, mask=hist_mask)


def score_chunks(
    qu: torch.Tensor, qscal: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor,
    req_to_token: torch.Tensor, plan: torch.Tensor, stats: "ChunkStats", sm_scale: float,
    num_kv_heads: int, num_chunks: int, num_warps: int = 4,
) -> None:
    """Fill ``stats`` for every (request, query head, chunk) of the plan's scored regions."""
    bsz, hq, d = qu.shape
    group = hq // num_kv_heads
    nc = num_chunks
    if not (qu.is_contiguous() and qscal.is_contiguous()):
        raise ValueError("qu and qscal must be contiguous")
    if bsz * hq * nc > stats.capacity:
        raise ValueError(f"chunk statistics hold {stats.capacity} rows, need {bsz * hq * nc}")
    _score_kernel[(bsz, num_kv_heads, nc)](
        qu, qscal, codes, factor, req_to_token, plan,
        stats.max, stats.top, stats.count,
        sm_scale, codes.stride(0), codes.stride(1), factor.stride(0), req_to_token.stride(0), hq, nc,
        GROUP=group, GP=group_pad(group), D=d, BLOCK_N=SCORE_BLOCK_N,
        NB=HIST_BINS, BIN_W=BIN_WIDTH, PLAN_FIELDS=plan.shape[1], num_warps=num_warps,
    )


class ChunkStats:
    """Per (request, query head, chunk) statistics of the score pass (flat, CUDA-graph stable)."""

    def __init__(self, capacity: int, device):
        n = self.capacity = capacity  # >= batch * query heads * chunks of any call
        self.max = torch.empty(n, dtype=torch.float32, device=device)
        self.top = torch.empty(n, dtype=torch.int32, device=device)
        self.count = torch.empty(n, HIST_BINS, dtype=torch.int32, device=device)
