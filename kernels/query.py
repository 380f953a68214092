"""Fused query rotation + INT4 quantization per (request, query head) (reference: ``quantize_query``
and ``query_nibble_table``): the score kernel reads the INT4 query as a nibble table, each program
writing its heads' bytes of every entry. A program takes one query head, or a kv-head's whole group
at large batches (``query_heads_per_program``).

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
from sglang_rabitq.reference.codes import key_bits_of
from sglang_rabitq.kernels.estimate import table_entries, table_words

PRIOR_BLOCK = 64  # keys per block of the sink/window mass


@triton.jit
def _prepare_query_kernel(
    q_ptr, rot_ptr, qscal_ptr, table_ptr, seed_ptr, stride_qb, stride_qh,
    k_ptr, r2t_ptr, plan_ptr, center_ptr, prior_ptr, prior_scale, stride_kn, stride_kh, stride_r2t,
    pending_ptr, code_ptr, factor_ptr, stride_cn, stride_ch, stride_fn, stride_fh,
    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, WPE: tl.constexpr, RANDOM: tl.constexpr,
    PRIOR: tl.constexpr, PLAN_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, ENC_N: tl.constexpr, ENC_D: tl.constexpr, KEY_BITS: tl.constexpr,
    HPP: tl.constexpr, HPP_P: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * HPP  # this program's first query head
    hkv = h0 // GROUP
    offs_d = tl.arange(0, D)
    rot = tl.load(rot_ptr + hkv * D * D + offs_d[:, None] * D + offs_d[None, :])  # once for its HPP heads
    # byte g of an entry: head g of the group. Addressed in bytes: a byte pointer cast from entry
    # pointers keeps their contiguity, and with one head a group Triton then stores two entries'
    # bytes as one 16-bit word (odd entries never written; tests/test_kernel_sass.py)
    first = table_entries(table_ptr, b, hkv, HQ // GROUP, D, WPE).to(tl.pointer_type(tl.uint8))
    offs_n = tl.arange(0, 16)
    nbits = (offs_n[:, None] >> tl.arange(0, 4)[None, :]) & 1
    idx = tl.arange(0, D // 4)[:, None] * 16 + offs_n[None, :]
    qs_rows = ()  # with PRIOR: each head's query at prior_scale, for the sink/window mass below
    for j in tl.static_range(HPP):
        hq = h0 + j
        q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + offs_d).to(tl.float32)
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
        # this head's byte of every nibble-table entry [p, n]: sum of q_u[4p + i] over the set bits i of n
        qi = tl.reshape(qu.to(tl.int32), (D // 4, 4))
        entry = tl.sum(qi[:, None, :] * nbits[None, :, :], axis=2)  # [D / 4, 16]
        tl.store(first + idx * (4 * WPE) + hq % GROUP, entry.to(tl.uint8))
        if PRIOR:
            qs_rows = qs_rows + (q * prior_scale,)
    if PRIOR:
        # per head, log sum exp(prior_scale * <q, k - c>) over [0, S') and [E, L), walked as one index
        # range, each block of keys read once for all of the program's heads; nothing to weigh against
        # when the scored region is empty (then the request attends densely)
        plan = plan_ptr + b * PLAN_FIELDS
        rpi = tl.load(plan).to(tl.int64)
        sink_end, score_end, length = tl.load(plan + 1), tl.load(plan + 2), tl.load(plan + 4)
        n_dense = tl.where(score_end > sink_end, sink_end + length - score_end, 0)
        center = tl.load(center_ptr + hkv * D + offs_d)
        offs_h = tl.arange(0, HPP_P)
        qc = tl.zeros((HPP_P,), tl.float32)
        for j in tl.static_range(HPP):
            qc = tl.where(offs_h == j, tl.sum(qs_rows[j] * center, axis=0), qc)
        m_i = tl.full((HPP_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((HPP_P,), tl.float32)
        for t0 in range(0, n_dense, BLOCK_K):
            t = t0 + tl.arange(0, BLOCK_K)
            ok = t < n_dense
            pos = tl.where(t < sink_end, t, t - sink_end + score_end)
            slot = tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * stride_kn + hkv * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
            k = k.to(tl.float32)
            s = tl.zeros((HPP_P, BLOCK_K), tl.float32)
            for j in tl.static_range(HPP):
                s = tl.where(offs_h[:, None] == j, tl.sum(k * qs_rows[j][None, :], axis=1)[None, :], s)
            s = tl.where((offs_h < HPP)[:, None] & ok[None, :], s - qc[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite for the program's heads: every block holds a key
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # the padding rows of HPP_P
            l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), axis=1)
            m_i = m_new
        tl.store(prior_ptr + b * HQ + h0 + offs_h, tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf")),
                 mask=offs_h < HPP)
    if CHUNK > 0:
        if h0 % GROUP == 0:  # one program per kv-head of the request encodes its chunk
            for j0 in range(0, CHUNK, ENC_N):
                offs_j = j0 + tl.arange(0, ENC_N)
                slots = tl.load(pending_ptr + b * CHUNK + offs_j, mask=offs_j < CHUNK, other=-1).to(tl.int64)
                encode_block(k_ptr, slots, rot_ptr, center_ptr, code_ptr, factor_ptr, hkv,
                             stride_kn, stride_kh, stride_cn, stride_ch, stride_fn, stride_fh, D, ENC_N, ENC_D,
                             KEY_BITS)


def query_heads_per_program(bsz: int, num_q_heads: int, num_kv_heads: int, num_sms: int) -> int:
    """Query heads of one program: a whole group, its kv-head's rotation (D x D fp32) read once,
    where the batch's (request, kv-head) programs fill the GPU; one otherwise, as many programs as
    heads. One head a program, each reads 64 KB of rotation at D 128: 64 MB from L2 at batch 32 on
    the Llama-3.1-8B shape; a group a program at batch 1 left the GPU idle (2 programs instead of 12
    on the Qwen2.5-1.5B shape: 3.5 -> 5.1 us, ab_step-query-per-kv-head.md). A function of the batch
    size's power-of-two bucket, as the chunk count is (``decode.chunks_for_batch``)."""
    return num_q_heads // num_kv_heads if triton.next_power_of_2(bsz) * num_kv_heads >= num_sms else 1


def prepare_query(
    q: torch.Tensor, rot: torch.Tensor, qscal: torch.Tensor, qtable: torch.Tensor,
    seed: torch.Tensor | None = None, rounding: str = "nearest", *,
    prior_lse: torch.Tensor | None = None, k_buf: torch.Tensor | None = None, req_to_token: torch.Tensor | None = None,
    plan: torch.Tensor | None = None, center: torch.Tensor | None = None, prior_scale: float = 1.0,
    pending: torch.Tensor | None = None, codes: torch.Tensor | None = None, factor: torch.Tensor | None = None,
    heads_per_program: int = 1,
) -> None:
    """``q [B, Hq, D]`` -> ``qscal [B, Hq, 3]`` = (delta, min, sum(q_u)) and the INT4 query ``q_u`` as
    its nibble table ``qtable [B, Hkv, D // 4, 16, table_words(group)] int32`` (``query_nibble_table``;
    the bytes of no head, where the group is not a multiple of 4, are left as they are: zero them once).

    ``prior_lse [B, Hq]`` (optional, with ``k_buf``, ``req_to_token``, the decode ``plan`` rows and
    the keys' ``center [Hkv, D]``): per query head, ``dense_region_lse`` of the request's sink and
    window at ``prior_scale``; ``-inf`` for a request with an empty scored region.

    ``pending [B * chunk]`` (optional, with ``k_buf``, ``center``, ``codes``, ``factor``): request
    ``b``'s slots to encode at ``[b * chunk, (b + 1) * chunk)``, -1 for none (``encode_slots``).

    ``heads_per_program``: 1 or the group (``query_heads_per_program``); the results are the same."""
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
    group = hq // hkv
    if heads_per_program not in (1, group):
        raise ValueError(f"heads_per_program must be 1 or the group ({group}), got {heads_per_program}")
    if not qtable.is_contiguous() or tuple(qtable.shape) != (b, hkv, d // 4, 16, table_words(group)):
        raise ValueError(f"qtable must be a contiguous [{b}, {hkv}, {d // 4}, 16, {table_words(group)}] table")
    k_buf = k_buf if (with_prior or encoding) else q  # placeholders: never read
    codes, factor = (codes, factor) if encoding else (qtable, qscal)
    _prepare_query_kernel[(b, hq // heads_per_program)](
        q, rot, qscal, qtable, seed if random else qscal, q.stride(0), q.stride(1),
        k_buf, req_to_token if with_prior else qtable, plan if with_prior else qtable,
        center if center is not None else qscal, prior_lse if with_prior else qscal, float(prior_scale),
        k_buf.stride(0), k_buf.stride(1), req_to_token.stride(0) if with_prior else 0,
        pending if encoding else qtable, codes, factor,
        codes.stride(0) if encoding else 0, codes.stride(1) if encoding else 0, factor.stride(0) if encoding else 0,
        factor.stride(1) if encoding else 1,
        HQ=hq, GROUP=group, D=d, WPE=table_words(group), RANDOM=random,
        PRIOR=with_prior, PLAN_FIELDS=plan.shape[1] if with_prior else 1, BLOCK_K=PRIOR_BLOCK,
        CHUNK=chunk, ENC_N=min(ENCODE_BLOCK_N, triton.next_power_of_2(max(chunk, 1))), ENC_D=ENCODE_BLOCK_D,
        KEY_BITS=key_bits_of(codes, d) if encoding else 1,
        HPP=heads_per_program, HPP_P=triton.next_power_of_2(heads_per_program),
    )
