"""The binary x INT4 estimate of a block of tokens, shared by the score and attention kernels so
both compute bit-identical logits (reference: ``estimate_int`` times the softmax scale)."""

import triton
import triton.language as tl


@triton.jit
def _popcount(x):
    """Set bits of each int32 (SWAR; every arithmetic shift is masked, so the sign bit is harmless)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def block_logits(
    codes_ptr, factor_ptr, slots, valid, hkv, stride_cn, stride_ch, stride_fn,
    qu, delta, qmin, qsum, sm_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Estimated logits ``[GP, BLOCK_N]`` (query heads x tokens) of the tokens at ``slots``.

    ``qu [GP, D]`` int8 holds the INT4 queries (rows past the group are zero);
    ``delta, qmin, qsum [GP]``. Invalid tokens get -inf.
    """
    WORDS: tl.constexpr = D // 32
    offs_w = tl.arange(0, WORDS)
    words = tl.load(codes_ptr + slots[None, :] * stride_cn + hkv * stride_ch + offs_w[:, None],
                    mask=valid[None, :], other=0)  # [WORDS, BLOCK_N]
    bits = (words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1  # bit j of word w is dim 32 w + j
    bits = tl.reshape(bits, (D, BLOCK_N)).to(tl.int8)
    b_dot_q = tl.dot(qu, bits, out_dtype=tl.int32).to(tl.float32)  # <b, q_u>
    popcount = tl.sum(_popcount(words), axis=0).to(tl.float32)
    g = tl.load(factor_ptr + slots * stride_fn + hkv, mask=valid, other=0.0)
    ip = (2.0 * delta[:, None] * b_dot_q + 2.0 * qmin[:, None] * popcount[None, :]
          - (delta * qsum)[:, None] - D * qmin[:, None])
    return tl.where(valid[None, :], g[None, :] * ip * sm_scale, float("-inf"))


@triton.jit
def load_group_query(qu_ptr, qscal_ptr, b, hkv, HQ, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """INT4 queries of kv-head ``hkv``'s query heads: ``qu [GP, D]`` and (delta, min, sum) ``[GP]``."""
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GROUP
    rows = b * HQ + hkv * GROUP + offs_g
    qu = tl.load(qu_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0)
    delta = tl.load(qscal_ptr + rows * 3 + 0, mask=gmask, other=0.0)
    qmin = tl.load(qscal_ptr + rows * 3 + 1, mask=gmask, other=0.0)
    qsum = tl.load(qscal_ptr + rows * 3 + 2, mask=gmask, other=0.0)
    return qu, delta, qmin, qsum


@triton.jit
def chunk_bounds(plan_ptr, b, c, PLAN_FIELDS: tl.constexpr):
    """Token range [start, end) of chunk ``c`` of request ``b``'s scored region (see DecodePlan)."""
    sink_end = tl.load(plan_ptr + b * PLAN_FIELDS + 1)
    score_end = tl.load(plan_ptr + b * PLAN_FIELDS + 2)
    chunk_len = tl.load(plan_ptr + b * PLAN_FIELDS + 3)
    start = sink_end + c * chunk_len
    end = tl.minimum(start + chunk_len, score_end)
    return start, end


def group_pad(group: int) -> int:
    """Rows the kernels give a kv-head's query heads (a power of two)."""
    return triton.next_power_of_2(group)
