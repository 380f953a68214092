"""Sparse decode attention: exact attention over the selected tokens plus the dense sink and
window, split over the score pass's chunks, merged by log-sum-exp (reference:
``sparse_decode_attention``).

Program ``c < NC`` re-estimates its chunk's logits (bit-identical to the score pass), keeps the
tokens at or above any of its query heads' thresholds (the GQA union) and reads K/V of those rows
only. Program ``c == NC`` attends the sink ``[0, S')`` and the window ``[E, L)``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import block_logits, chunk_bounds, group_pad, load_group_query

# Triton's interpreter multiplies bf16 tiles as raw integers: run its dots in fp32 instead
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, qu_ptr, qscal_ptr, codes_ptr, factor_ptr, r2t_ptr, plan_ptr, thr_ptr,
    po_ptr, plse_ptr, count_ptr,
    sm_scale, score_scale, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cn, stride_ch, stride_fn, stride_r2t, HQ, HKV, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DENSE: tl.constexpr, PLAN_FIELDS: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    c = tl.program_id(2)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    rpi = tl.load(plan_ptr + b * PLAN_FIELDS + 0).to(tl.int64)
    sink_end = tl.load(plan_ptr + b * PLAN_FIELDS + 1)
    score_end = tl.load(plan_ptr + b * PLAN_FIELDS + 2)
    length = tl.load(plan_ptr + b * PLAN_FIELDS + 4)
    chunk_start, chunk_end = chunk_bounds(plan_ptr, b, c, PLAN_FIELDS)
    is_chunk = c < NC
    # virtual token index v -> position: a chunk maps v to itself; the last program walks the
    # sink and then jumps over the scored region into the window
    lo_v = tl.where(is_chunk, chunk_start, 0)
    hi_v = tl.where(is_chunk, chunk_end, sink_end + length - score_end)
    jump_at = tl.where(is_chunk, hi_v, sink_end)
    jump = score_end - sink_end

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    thr = tl.load(thr_ptr + b * HQ + heads, mask=gmask, other=float("inf"))
    qu, delta, qmin, qsum = load_group_query(qu_ptr, qscal_ptr, b, hkv, HQ, GROUP, GP, D)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    n_kept = tl.sum(tl.zeros((BLOCK_N,), tl.int32), axis=0)
    for v0 in range(lo_v, hi_v, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        valid = v < hi_v
        pos = v + tl.where(v >= jump_at, jump, 0)
        slots = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0).to(tl.int64)
        keep = valid
        if not DENSE:
            if is_chunk:
                lg = block_logits(codes_ptr, factor_ptr, slots, valid, hkv, stride_cn, stride_ch, stride_fn,
                                  qu, delta, qmin, qsum, score_scale, D, BLOCK_N)
                over = (lg >= thr[:, None]) & gmask[:, None]
                keep = valid & (tl.max(over.to(tl.int32), axis=0) > 0)
        n_block = tl.sum(keep.to(tl.int32), axis=0)
        n_kept += n_block
        if n_block > 0:  # a block with no kept token reads nothing and computes nothing
            # masked rows issue no memory traffic: K/V are read for kept tokens only
            k = tl.load(k_ptr + slots[:, None] * stride_kn + hkv * stride_kh + offs_d[None, :], mask=keep[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp(m_i - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vv = tl.load(v_ptr + slots[:, None] * stride_vn + hkv * stride_vh + offs_d[None, :], mask=keep[:, None], other=0.0)
            if DOT_F32:
                vv = vv.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
    part = (b * HQ + heads) * (NC + 1) + c
    has = l_i > 0
    tl.store(po_ptr + part[:, None] * D + offs_d[None, :], acc / tl.where(has, l_i, 1.0)[:, None], mask=gmask[:, None])
    tl.store(plse_ptr + part, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=gmask)
    tl.store(count_ptr + (b * HKV + hkv) * (NC + 1) + c, n_kept)


@triton.jit
def _merge_kernel(po_ptr, plse_ptr, out_ptr, stride_ob, stride_oh, HQ, NPART,
                  D: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * HQ + h) * NPART
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    m = tl.max(tl.full((BLOCK_P,), float("-inf"), tl.float32), axis=0)
    for p0 in range(0, NPART, BLOCK_P):
        m = tl.maximum(m, tl.max(tl.load(plse_ptr + row + p0 + offs_p, mask=p0 + offs_p < NPART, other=float("-inf")), axis=0))
    m_ref = tl.where(m > float("-inf"), m, 0.0)
    acc = tl.zeros((D,), tl.float32)
    den = tl.sum(tl.zeros((BLOCK_P,), tl.float32), axis=0)
    for p0 in range(0, NPART, BLOCK_P):
        ok = p0 + offs_p < NPART
        w = tl.exp(tl.load(plse_ptr + row + p0 + offs_p, mask=ok, other=float("-inf")) - m_ref)
        part = tl.load(po_ptr + (row + p0 + offs_p)[:, None] * D + offs_d[None, :], mask=ok[:, None] & (w[:, None] > 0), other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
        den += tl.sum(w, axis=0)
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def sparse_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, qu: torch.Tensor, qscal: torch.Tensor,
    codes: torch.Tensor, factor: torch.Tensor, req_to_token: torch.Tensor, plan: torch.Tensor,
    thr: torch.Tensor, partial_out: torch.Tensor, partial_lse: torch.Tensor, kept: torch.Tensor,
    sm_scale: float, num_chunks: int, dense: bool, block_n: int = 64, score_scale: float | None = None,
    num_warps: int = 4,
) -> None:
    """Partial outputs ``[B * Hq * (NC + 1), D]`` and their log-sum-exp for ``merge_partials``."""
    bsz, hq, d = q.shape
    hkv = k_buf.shape[1]
    group = hq // hkv
    _sparse_attention_kernel[(bsz, hkv, num_chunks + 1)](
        q, k_buf, v_buf, qu, qscal, codes, factor, req_to_token, plan, thr,
        partial_out, partial_lse, kept,
        sm_scale, sm_scale if score_scale is None else score_scale, q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        codes.stride(0), codes.stride(1), factor.stride(0), req_to_token.stride(0), hq, hkv, num_chunks,
        GROUP=group, GP=group_pad(group), D=d, BLOCK_N=block_n,
        DENSE=dense, PLAN_FIELDS=plan.shape[1], DOT_F32=INTERPRETED, num_warps=num_warps,
    )


def merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, num_parts: int) -> None:
    """``out [B, Hq, D]`` = the log-sum-exp weighted mean of each head's ``num_parts`` partials."""
    bsz, hq, d = out.shape
    _merge_kernel[(bsz, hq)](
        partial_out, partial_lse, out, out.stride(0), out.stride(1), hq, num_parts,
        D=d, BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
    )
