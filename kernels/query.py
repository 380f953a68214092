"""Fused query rotation + INT4 quantization per (request, kv-head), all query heads of its group at
once (reference: ``quantize_query`` and ``query_planes``): the estimate kernels read the 4 bit-planes
of the INT4 query.

Two more jobs ride on the same programs, each a few hundred keys per request that would otherwise
cost a launch of their own in every sparse layer:
- with a plan, the exact attention mass of the request's always-attended tokens (sink and window)
  for top-p over the whole context (reference: ``dense_region_lse``);
- with a lazy-encode list, the encoding of the request's chunk of keys that left the window
  (``encode.encode_block``). Those slots lie in this step's window (the plan scores only what was
  encoded before it), so nothing of this step waits for their codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.encode import ENCODE_BLOCK_D, ENCODE_BLOCK_N, encode_block
from sglang_rabitq.kernels.estimate import group_pad

PRIOR_BLOCK = 64  # keys per block of the sink/window mass
ROT_BLOCK = 16  # query dimensions per step of the rotation
QUERY_WARPS = 4


@triton.jit
def _prepare_query_kernel(
    q_ptr, rot_ptr, qscal_ptr, qbits_ptr, seed_ptr, stride_qb, stride_qh,
    k_ptr, r2t_ptr, plan_ptr, center_ptr, prior_ptr, prior_scale, stride_kn, stride_kh, stride_r2t,
    pending_ptr, code_ptr, factor_ptr, stride_cn, stride_ch, stride_fn,
    HQ: tl.constexpr, GROUP: tl.constexpr, QP: tl.constexpr, D: tl.constexpr, RANDOM: tl.constexpr,
    PRIOR: tl.constexpr, PLAN_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr, ENC_N: tl.constexpr, ENC_D: tl.constexpr,
):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    offs_g = tl.arange(0, QP)
    gmask = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    offs_d = tl.arange(0, D)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    # q @ P (as for the keys), BLOCK_D rows of P at a time, exact fp32 FMAs (a TF32 dot would move
    # the INT4 rounding); rows past the group are zeros, never stored
    rq = tl.zeros((QP, D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_k = d0 + tl.arange(0, BLOCK_D)
        qk = tl.load(q_row + offs_k[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        rk = tl.load(rot_ptr + hkv * D * D + offs_k[:, None] * D + offs_d[None, :])
        rq = tl.dot(qk, rk, rq, input_precision="ieee")
    qmin = tl.min(rq, axis=1)
    delta = (tl.max(rq, axis=1) - qmin) / 15.0
    scaled = (rq - qmin[:, None]) / tl.where(delta > 0, delta, 1.0)[:, None]
    rows = b * HQ + heads
    if RANDOM:
        # a fresh draw every step: the seed lives in device memory and is bumped by the planner
        offs = rows[:, None] * D + offs_d[None, :]
        qu = tl.floor(scaled + tl.rand(tl.load(seed_ptr), offs))
    else:
        qu = tl.floor(scaled + 0.5)
    qu = tl.minimum(tl.maximum(qu, 0.0), 15.0)
    tl.store(qscal_ptr + rows * 3 + 0, delta, mask=gmask)
    tl.store(qscal_ptr + rows * 3 + 1, qmin, mask=gmask)
    tl.store(qscal_ptr + rows * 3 + 2, tl.sum(qu, axis=1), mask=gmask)
    # bit-planes, packed like the codes (bit d -> word d // 32, position d % 32; the sum is an OR)
    WORDS: tl.constexpr = D // 32
    qi = tl.reshape(qu.to(tl.int32), (QP, WORDS, 32))
    offs_w = tl.arange(0, WORDS)
    for j in tl.static_range(4):
        words = tl.sum(((qi >> j) & 1) << tl.arange(0, 32)[None, None, :], axis=2)
        tl.store(qbits_ptr + (rows[:, None] * 4 + j) * WORDS + offs_w[None, :], words, mask=gmask[:, None])
    if PRIOR:
        # log sum exp(prior_scale * <q, k - c>) over [0, S') and [E, L), walked as one index range;
        # nothing to weigh against when the scored region is empty (then the request attends densely)
        plan = plan_ptr + b * PLAN_FIELDS
        rpi = tl.load(plan).to(tl.int64)
        sink_end, score_end, length = tl.load(plan + 1), tl.load(plan + 2), tl.load(plan + 4)
        n_dense = tl.where(score_end > sink_end, sink_end + length - score_end, 0)
        qs = tl.load(q_row + offs_d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * prior_scale
        qc = tl.sum(qs * tl.load(center_ptr + hkv * D + offs_d)[None, :], axis=1)
        m_i = tl.full((QP,), float("-inf"), tl.float32)
        l_i = tl.zeros((QP,), tl.float32)
        for t0 in range(0, n_dense, BLOCK_K):
            t = t0 + tl.arange(0, BLOCK_K)
            ok = t < n_dense
            pos = tl.where(t < sink_end, t, t - sink_end + score_end)
            slot = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * stride_kn + hkv * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(qs, tl.trans(k.to(tl.float32)), input_precision="ieee") - qc[:, None]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a key
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(prior_ptr + rows, tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf")), mask=gmask)
    if CHUNK > 0:
        for j0 in range(0, CHUNK, ENC_N):
            offs_j = j0 + tl.arange(0, ENC_N)
            slots = tl.load(pending_ptr + b * CHUNK + offs_j, mask=offs_j < CHUNK, other=-1).to(tl.int64)
            encode_block(k_ptr, slots, rot_ptr, center_ptr, code_ptr, factor_ptr, hkv,
                         stride_kn, stride_kh, stride_cn, stride_ch, stride_fn, D, ENC_N, ENC_D)


def prepare_query(
    q: torch.Tensor, rot: torch.Tensor, qscal: torch.Tensor, qbits: torch.Tensor,
    seed: torch.Tensor | None = None, rounding: str = "nearest", *,
    prior_lse: torch.Tensor | None = None, k_buf: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
    plan: torch.Tensor | None = None, center: torch.Tensor | None = None, prior_scale: float = 1.0,
    pending: torch.Tensor | None = None, codes: torch.Tensor | None = None, factor: torch.Tensor | None = None,
) -> None:
    """``q [B, Hq, D]`` -> ``qscal [B, Hq, 3]`` = (delta, min, sum(q_u)) and the INT4 query ``q_u`` as
    its bit-planes ``qbits [B, Hq, 4, D // 32] int32`` (``query_planes``).

    ``prior_lse [B, Hq]`` (optional, with ``k_buf``, ``req_to_token``, the decode ``plan`` rows and
    the keys' ``center [Hkv, D]``): per query head, ``dense_region_lse`` of the request's sink and
    window at ``prior_scale``; ``-inf`` for a request with an empty scored region.

    ``pending [B * chunk]`` (optional, with ``k_buf``, ``center``, ``codes``, ``factor``): request
    ``b``'s slots to encode at ``[b * chunk, (b + 1) * chunk)``, -1 for none (``encode_slots``)."""
    b, hq, d = q.shape
    hkv = rot.shape[0]
    random = rounding == "random"
    if random and seed is None:
        raise ValueError("randomized rounding needs a device seed tensor")
    with_prior = prior_lse is not None
    if with_prior and any(t is None for t in (k_buf, req_to_token, plan, center)):
        raise ValueError("the sink/window mass needs k_buf, req_to_token, plan and center")
    encoding = pending is not None
    if encoding and (any(t is None for t in (k_buf, center, codes, factor)) or pending.numel() % max(b, 1)):
        raise ValueError("the lazy encode needs k_buf, center, codes, factor and a chunk of slots per request")
    chunk = pending.numel() // b if encoding and b else 0
    k_buf = k_buf if (with_prior or encoding) else q  # placeholders: never read
    codes, factor = (codes, factor) if encoding else (qbits, qscal)
    _prepare_query_kernel[(b, hkv)](
        q, rot, qscal, qbits, seed if random else qscal, q.stride(0), q.stride(1),
        k_buf, req_to_token if with_prior else qbits, plan if with_prior else qbits,
        center if center is not None else qscal, prior_lse if with_prior else qscal, float(prior_scale),
        k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0) if with_prior else 0,
        pending if encoding else qbits, codes, factor,
        codes.stride(0) if encoding else 0, codes.stride(1) if encoding else 0, factor.stride(0) if encoding else 0,
        HQ=hq, GROUP=hq // hkv, QP=max(16, group_pad(hq // hkv)), D=d, RANDOM=random,
        PRIOR=with_prior, PLAN_FIELDS=plan.shape[1] if with_prior else 1, BLOCK_K=PRIOR_BLOCK, BLOCK_D=ROT_BLOCK,
        CHUNK=chunk, ENC_N=min(ENCODE_BLOCK_N, triton.next_power_of_2(max(chunk, 1))), ENC_D=ENCODE_BLOCK_D,
        num_warps=QUERY_WARPS,
    )
