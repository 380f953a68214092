"""Sparse decode attention: exact attention over the selected tokens plus the dense sink and
window, split over the score pass's chunks, merged by log-sum-exp (reference:
``sparse_decode_attention``).

Program ``c < NC`` reads its chunk's stored logits, keeps the tokens at or above any of its query
heads' thresholds (the GQA union), compacts their slots into its slice of the workspace, then
attends over the compacted list in full blocks: its work falls with the budget. Program
``c == NC`` attends the sink ``[0, S')`` and the window ``[E, L)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import INTERPRETED, chunk_bounds, group_pad, logit_rows, offsets_fit_32, slot_offsets
from sglang_rabitq.kernels.launch_chain import chain_options, chain_start

# logits per inner block of the selection: the walk over every logit is a chain of memory round
# trips per program, so few, wide blocks (512 vs 256: with the slots read beside the logits, step
# 1.02-1.04x at batch 32, ab_step-select-r2t.md)
SELECT_BLOCK_N = 512


def attention_launch(group: int, head_dim: int) -> dict:
    """``sparse_attention``'s launch configuration: tokens per gather block, warps, pipeline stages and
    register cap (None: uncapped). The same for every shape: on an H100 none of 7 others (gather blocks
    of 32, 2 warps, 2 stages, caps of 64-80 registers, loads a block ahead) beat it by more than the
    noise at 32K-128K, batches 1-32, three model shapes: the best of each point 0.95-1.03x, while two
    timings of this one differed by up to 7 % (ab_step-attention-launch-h100.md)."""
    return dict(block_n=64, num_warps=4, num_stages=3, max_registers=None)


@triton.jit
def _attend_block(q, k_ptr, v_ptr, slots, keep, stride_kn, stride_vn,
                  m_i, l_i, acc, sm_scale, D: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax update of ``(m, l, acc)`` with the kept tokens at ``slots`` (``slot_offsets``) of
    the kv-head's keys and values ``k_ptr``, ``v_ptr``."""
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + slots[:, None] * stride_kn + offs_d[None, :], mask=keep[:, None], other=0.0)
    vv = tl.load(v_ptr + slots[:, None] * stride_vn + offs_d[None, :], mask=keep[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        vv = vv.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * sm_scale
    s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, logit_ptr, index_ptr, r2t_ptr, plan_ptr, thr_ptr,
    po_ptr, plse_ptr, count_ptr,
    sm_scale, stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_r2t, HQ, HKV, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SEL_N: tl.constexpr,
    DENSE: tl.constexpr, PLAN_FIELDS: tl.constexpr, DOT_F32: tl.constexpr, OFFS32: tl.constexpr,
    PDL: tl.constexpr,
):
    chain_start(PDL)
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
    chunk_len = tl.load(plan_ptr + b * PLAN_FIELDS + 3)
    length = tl.load(plan_ptr + b * PLAN_FIELDS + 4)
    work = tl.load(plan_ptr + b * PLAN_FIELDS + 5).to(tl.int64)
    is_chunk = c < NC
    chunk_start, chunk_end = chunk_bounds(plan_ptr, b, c, PLAN_FIELDS)
    chunk_end = tl.where(is_chunk, chunk_end, chunk_start)  # the last program selects nothing

    k_ptr += hkv.to(tl.int64) * stride_kh  # this kv-head's keys and values: per-token offsets from here on
    v_ptr += hkv.to(tl.int64) * stride_vh
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    thr = tl.load(thr_ptr + b * HQ + heads, mask=gmask, other=float("inf"))
    rows = logit_rows(plan_ptr, b, heads, HQ, NC, PLAN_FIELDS)
    # this program's slice of the index workspace: request rows of NC * chunk_len per kv-head
    index = index_ptr + work * HKV + hkv * (NC * chunk_len) + c * chunk_len - chunk_start
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)

    # 1. select: the slots of kept tokens, in order, at index[chunk_start : chunk_start + n]
    n = chunk_start + tl.sum(tl.zeros((SEL_N,), tl.int32), axis=0)
    for n0 in range(chunk_start, chunk_end, SEL_N):
        pos = n0 + tl.arange(0, SEL_N)
        valid = pos < chunk_end
        # every slot of the block, read beside the logits rather than after the comparison: one round
        # trip per block instead of two (the row is shared with the other kv-heads' programs, in L2)
        slots = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0)
        if DENSE:
            keep = valid
        else:
            lg = tl.load(logit_ptr + rows[:, None] + pos[None, :], mask=gmask[:, None] & valid[None, :],
                         other=float("-inf")).to(tl.float32)
            keep = valid & (tl.max((lg >= thr[:, None]).to(tl.int32), axis=0) > 0)
        at = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(index + at, slots, mask=keep)
        n += tl.sum(keep.to(tl.int32), axis=0)
    tl.debug_barrier()  # this program's index stores are visible to all its threads
    # 2. attend the compacted list in full blocks
    for i0 in range(chunk_start, n, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        ok = i < n
        slots = slot_offsets(tl.load(index + i, mask=ok, other=0, cache_modifier=".cg"), OFFS32)
        m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, slots, ok, stride_kn, stride_vn, m_i, l_i, acc, sm_scale, D, DOT_F32)
    # 3. the last program: the sink, then (jumping over the scored region) the window
    hi_v = tl.where(is_chunk, 0, sink_end + length - score_end)
    for v0 in range(0, hi_v, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        valid = v < hi_v
        pos = v + tl.where(v >= sink_end, score_end - sink_end, 0)
        slots = slot_offsets(tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0), OFFS32)
        m_i, l_i, acc = _attend_block(q, k_ptr, v_ptr, slots, valid, stride_kn, stride_vn, m_i, l_i, acc, sm_scale, D,
                                      DOT_F32)
    part = (b * HQ + heads) * (NC + 1) + c
    has = l_i > 0
    tl.store(po_ptr + part[:, None] * D + offs_d[None, :], acc / tl.where(has, l_i, 1.0)[:, None], mask=gmask[:, None])
    tl.store(plse_ptr + part, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=gmask)
    tl.store(count_ptr + (b * HKV + hkv) * (NC + 1) + c, n - chunk_start + hi_v)


@triton.jit(do_not_specialize=["NPART"])  # per-batch sizes: one compile (package doc)
def _merge_kernel(po_ptr, plse_ptr, out_ptr, stride_ob, stride_oh, HQ, NPART,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, NPP: tl.constexpr, BLOCK_P: tl.constexpr,
                  PDL: tl.constexpr):
    chain_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * HQ + h) * NPART
    offs = tl.arange(0, NPP)
    m = tl.max(tl.load(plse_ptr + row + offs, mask=offs < NPART, other=float("-inf")), axis=0)
    m_ref = tl.where(m > float("-inf"), m, 0.0)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    den = tl.sum(tl.zeros((BLOCK_P,), tl.float32), axis=0)
    for p0 in range(0, NPART, BLOCK_P):
        ok = p0 + offs_p < NPART
        # both loads at once (at batch 1 the loop is latency bound): every part was written, an
        # empty one as zeros with weight 0
        w = tl.exp(tl.load(plse_ptr + row + p0 + offs_p, mask=ok, other=float("-inf")) - m_ref)
        part = tl.load(po_ptr + (row + p0 + offs_p)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
        den += tl.sum(w, axis=0)
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def sparse_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, logits: torch.Tensor, index: torch.Tensor,
    req_to_token: torch.Tensor, plan: torch.Tensor, thr: torch.Tensor, partial_out: torch.Tensor,
    partial_lse: torch.Tensor, kept: torch.Tensor, sm_scale: float, num_chunks: int, dense: bool,
    **launch,
) -> None:
    """Partial outputs ``[B * Hq * (NC + 1), D]`` and their log-sum-exp for ``merge_partials``.

    ``logits``: the score pass's fp16 logits; ``index``: int32 workspace of the compacted slots
    (both laid out per the plan's ``work`` offsets). ``dense`` keeps every token of the chunks.
    ``launch``: overrides of ``attention_launch``'s configuration.
    """
    bsz, hq, d = q.shape
    hkv = k_buf.shape[1]
    group = hq // hkv
    cfg = attention_launch(group, d)
    if not launch.keys() <= cfg.keys():
        raise TypeError(f"unknown attention launch settings {sorted(launch.keys() - cfg.keys())}; known: {sorted(cfg)}")
    cfg.update(launch)
    _sparse_attention_kernel[(bsz, hkv, num_chunks + 1)](
        q, k_buf, v_buf, logits, index, req_to_token, plan, thr,
        partial_out, partial_lse, kept,
        sm_scale, q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), hq, hkv, num_chunks,
        GROUP=group, GP=group_pad(group), D=d, BLOCK_N=cfg["block_n"], SEL_N=SELECT_BLOCK_N,
        # Triton's interpreter multiplies bf16 tiles as raw integers: its dots run in fp32
        DENSE=dense, PLAN_FIELDS=plan.shape[1], DOT_F32=INTERPRETED, OFFS32=offsets_fit_32(k_buf, v_buf),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["max_registers"],
        **chain_options(q.device),
    )


MERGE_BLOCK_D = 32  # dims per merge program: D / 32 programs per head share its partials' reads


def merge_constexprs(num_parts: int, head_dim: int) -> dict:
    """The merge kernel's compile-time arguments for ``num_parts`` partials per head."""
    npp = triton.next_power_of_2(num_parts)
    block_d = min(MERGE_BLOCK_D, head_dim)
    # few, wide iterations: a [BLOCK_P, BLOCK_D] fp32 tile of up to 8K elements (64 registers a thread at 4 warps)
    return dict(D=head_dim, BLOCK_D=block_d, NPP=npp, BLOCK_P=min(8192 // block_d, npp))


def merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor, num_parts: int) -> None:
    """``out [B, Hq, D]`` = the log-sum-exp weighted mean of each head's ``num_parts`` partials.

    Split over the head dimension as well as the heads: at batch 1 one program per head left most
    of the GPU idle while it walked its partials (6.4 us of a 36 us step at 32K on the 1.5B shape)."""
    bsz, hq, d = out.shape
    consts = merge_constexprs(num_parts, d)
    _merge_kernel[(bsz, hq, d // consts["BLOCK_D"])](
        partial_out, partial_lse, out, out.stride(0), out.stride(1), hq, num_parts, **consts,
        **chain_options(out.device),
    )
