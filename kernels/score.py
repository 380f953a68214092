"""Score pass: per chunk of a request's scored region, the estimated logits' max, sum-exp and a
histogram of mass and count per bin (reference: ``hist_threshold``'s per-row statistics).

Bins have width ``BIN_WIDTH`` on an absolute grid counted down from the chunk's top bin
``floor(max / BIN_WIDTH)``, so chunks combine by shifting. No full-precision K is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import block_logits, chunk_bounds, load_group_query
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS

NO_BIN = tl.constexpr(-(2**30))  # top bin of a chunk with no tokens yet


@triton.jit
def _shift_rows(hist, shift, GP: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr):
    """``hist[g, j] <- hist[g, j - shift[g]]`` (zero where ``j < shift[g]``), row by row."""
    offs_g = tl.arange(0, GP)
    offs_j = tl.arange(0, NB)
    for g in tl.static_range(GROUP):
        row = tl.sum(tl.where(offs_g[:, None] == g, hist, 0), axis=0)
        sg = tl.sum(tl.where(offs_g == g, shift, 0), axis=0)
        moved = tl.sum(tl.where(offs_j[None, :] == (offs_j[:, None] - sg), row[None, :], 0), axis=1)
        hist = tl.where(offs_g[:, None] == g, moved[None, :], hist)
    return hist


@triton.jit
def _score_kernel(
    qu_ptr, qscal_ptr, codes_ptr, factor_ptr, r2t_ptr, plan_ptr,
    cmax_ptr, csum_ptr, ctop_ptr, cmass_ptr, ccount_ptr,
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
    m = tl.full((GP,), float("-inf"), tl.float32)  # stays -inf for an empty chunk: skipped later
    rpi = tl.load(plan_ptr + b * PLAN_FIELDS + 0).to(tl.int64)
    qu_t, delta, qmin, qsum = load_group_query(qu_ptr, qscal_ptr, b, hkv, HQ, GROUP, GP, D)
    offs_j = tl.arange(0, NB)
    s = tl.zeros((GP,), tl.float32)
    top = tl.full((GP,), NO_BIN, tl.int32)
    mass = tl.zeros((GP, NB), tl.float32)
    count = tl.zeros((GP, NB), tl.int32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        slots = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0).to(tl.int64)
        lg = block_logits(codes_ptr, factor_ptr, slots, valid, hkv, stride_cn, stride_ch, stride_fn,
                          qu_t, delta, qmin, qsum, sm_scale, D, BLOCK_N)
        lg = tl.where(gmask[None, :], lg, float("-inf"))
        m_new = tl.maximum(m, tl.max(lg, axis=0))
        top_new = tl.where(gmask, tl.floor(m_new / BIN_W).to(tl.int32), NO_BIN)
        shift = tl.minimum(top_new - top, NB)
        if tl.max(shift, axis=0) > 0:  # a head's top bin moved up: re-anchor its histogram
            count = _shift_rows(count, shift, GP, GROUP, NB)
            mass = _shift_rows(mass, shift, GP, GROUP, NB)
        alpha = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        mass = mass * alpha[:, None]
        s = s * alpha
        m = m_new
        top = top_new
        w = tl.where(valid[:, None] & gmask[None, :], tl.exp(lg - m[None, :]), 0.0)
        s += tl.sum(w, axis=0)
        k = top[None, :] - tl.floor(lg / BIN_W).to(tl.int32)  # bin counted down from the top
        for g in tl.static_range(GROUP):
            kg = tl.sum(tl.where(offs_g[None, :] == g, k, 0), axis=1)
            wg = tl.sum(tl.where(offs_g[None, :] == g, w, 0.0), axis=1)
            hit = (kg[:, None] == offs_j[None, :]) & valid[:, None]
            mass += tl.where(offs_g[:, None] == g, tl.sum(tl.where(hit, wg[:, None], 0.0), axis=0)[None, :], 0.0)
            count += tl.where(offs_g[:, None] == g, tl.sum(hit.to(tl.int32), axis=0)[None, :], 0)
    tl.store(cmax_ptr + out_rows, m, mask=gmask)
    tl.store(csum_ptr + out_rows, s, mask=gmask)
    tl.store(ctop_ptr + out_rows, top, mask=gmask)
    hist_off = out_rows[:, None] * NB + offs_j[None, :]
    hist_mask = gmask[:, None] & (end > start)
    tl.store(cmass_ptr + hist_off, mass, mask=hist_mask)
    tl.store(ccount_ptr + hist_off, count, mask=hist_mask)


def score_chunks(
    qu: torch.Tensor, qscal: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor,
    req_to_token: torch.Tensor, plan: torch.Tensor, stats: "ChunkStats", sm_scale: float,
    num_kv_heads: int, num_chunks: int, block_n: int = 64,
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
        stats.max, stats.sum, stats.top, stats.mass, stats.count,
        sm_scale, codes.stride(0), codes.stride(1), factor.stride(0), req_to_token.stride(0), hq, nc,
        GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n,
        NB=HIST_BINS, BIN_W=BIN_WIDTH, PLAN_FIELDS=plan.shape[1],
    )


class ChunkStats:
    """Per (request, query head, chunk) statistics of the score pass (flat, CUDA-graph stable)."""

    def __init__(self, capacity: int, device):
        n = self.capacity = capacity  # >= batch * query heads * chunks of any call
        self.max = torch.empty(n, dtype=torch.float32, device=device)
        self.sum = torch.empty(n, dtype=torch.float32, device=device)
        self.top = torch.empty(n, dtype=torch.int32, device=device)
        self.mass = torch.empty(n, HIST_BINS, dtype=torch.float32, device=device)
        self.count = torch.empty(n, HIST_BINS, dtype=torch.int32, device=device)
