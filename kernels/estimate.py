"""The binary x INT4 estimate of a block of tokens (reference: ``estimate_int`` times the softmax
scale), computed once per decode step by the score pass.

``<b, q_u> = sum_j 2^j popcount(b AND plane_j(q_u))`` on the packed words: no bit is unpacked, and
the integer part is exact, so any two kernels computing it agree to the bit.
"""

import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tests) runs no PTX: the popcount there is the portable version
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HW_POPCOUNT = not INTERPRETED


@triton.jit
def popcount(x, HW: tl.constexpr):
    """Set bits of each int32."""
    if HW:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:  # SWAR; every arithmetic shift is masked, so the sign bit is harmless
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24


@triton.jit
def block_logits(
    codes_ptr, factor_ptr, slots, valid, hkv, stride_cn, stride_ch, stride_fn,
    qbits_ptr, qrows, gmask, a, b, c,
    GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, HW: tl.constexpr,
):
    """Estimated logits ``[GP, BLOCK_N]`` (query heads x tokens) of the tokens at ``slots``:
    ``g * (a <b, q_u> + b popcount(b) + c)`` with the per-head ``(a, b, c)`` of ``logit_constants``.

    ``qrows [GP]``: rows of the query planes ``[rows, 4, D // 32]``. Invalid tokens get -inf.
    """
    WORDS: tl.constexpr = D // 32
    code = codes_ptr + slots * stride_cn + hkv * stride_ch
    b_dot_q = tl.zeros((GP, BLOCK_N), tl.int32)
    ones = tl.zeros((BLOCK_N,), tl.int32)
    for w in tl.static_range(WORDS):
        cw = tl.load(code + w, mask=valid, other=0)
        ones += popcount(cw, HW)
        for j in tl.static_range(4):
            plane = tl.load(qbits_ptr + (qrows * 4 + j) * WORDS + w, mask=gmask, other=0)
            b_dot_q += popcount(cw[None, :] & plane[:, None], HW) << j
    g = tl.load(factor_ptr + slots * stride_fn + hkv, mask=valid, other=0.0)
    ip = a[:, None] * b_dot_q.to(tl.float32) + (b[:, None] * ones.to(tl.float32)[None, :] + c[:, None])
    return tl.where(valid[None, :], g[None, :] * ip, float("-inf"))


@triton.jit
def logit_constants(qscal_ptr, qrows, gmask, sm_scale, D: tl.constexpr):
    """Per query head ``(a, b, c) [GP]``: the logit ``sm_scale * g * (2 delta <b, q_u> + 2 min popcount(b)
    - delta sum(q_u) - D min)`` is ``g * (a <b, q_u> + b popcount(b) + c)``."""
    delta = tl.load(qscal_ptr + qrows * 3 + 0, mask=gmask, other=0.0)
    qmin = tl.load(qscal_ptr + qrows * 3 + 1, mask=gmask, other=0.0)
    qsum = tl.load(qscal_ptr + qrows * 3 + 2, mask=gmask, other=0.0)
    return 2.0 * delta * sm_scale, 2.0 * qmin * sm_scale, -(delta * qsum + D * qmin) * sm_scale


@triton.jit
def chunk_bounds(plan_ptr, b, c, PLAN_FIELDS: tl.constexpr):
    """Token range [start, end) of chunk ``c`` of request ``b``'s scored region (see DecodePlan)."""
    sink_end = tl.load(plan_ptr + b * PLAN_FIELDS + 1)
    score_end = tl.load(plan_ptr + b * PLAN_FIELDS + 2)
    chunk_len = tl.load(plan_ptr + b * PLAN_FIELDS + 3)
    start = sink_end + c * chunk_len
    end = tl.minimum(start + chunk_len, score_end)
    return start, end


@triton.jit
def logit_rows(plan_ptr, b, heads, HQ, NC, PLAN_FIELDS: tl.constexpr):
    """Offsets ``[heads]`` (int64) such that ``logits[offset + position]`` is that head's stored logit
    of the token at ``position``: request ``b``'s rows start at ``work * HQ``, one row of
    ``NC * chunk_len`` per head, indexed from the start of the scored region."""
    sink_end = tl.load(plan_ptr + b * PLAN_FIELDS + 1)
    chunk_len = tl.load(plan_ptr + b * PLAN_FIELDS + 3)
    work = tl.load(plan_ptr + b * PLAN_FIELDS + 5).to(tl.int64)
    return work * HQ + heads.to(tl.int64) * (NC * chunk_len) - sink_end


def group_pad(group: int) -> int:
    """Rows the kernels give a kv-head's query heads (a power of two)."""
    return triton.next_power_of_2(group)
