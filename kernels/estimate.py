"""The binary x INT4 estimate of a block of tokens (reference: ``estimate_int`` times the softmax
scale), computed once per decode step by the score pass; codes of more bits per dimension sum it over
their bit-planes, weighted ``2^j``.

``<b, q_u>`` comes from the query's nibble table (``query_nibble_table``): each 4-bit nibble of a
code indexes a 16-entry table that holds, in one byte per query head of the group, the sum of
``q_u`` over the nibble's set bits. One L1-resident load per nibble serves every head at once,
where bit-planes cost 4 AND + 4 popcount (a quarter-rate instruction) per 32 dims and head. The
sum is exact integer arithmetic, so any two kernels computing it agree to the bit.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (CPU tests) runs no PTX: the popcount there is the portable version
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HW_POPCOUNT = not INTERPRETED


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def compiled_for(device: torch.device, min_capability: tuple[int, int]) -> bool:
    """Whether kernels launched on ``device`` are compiled (the interpreter runs no PTX) for a GPU of
    ``min_capability`` or newer: the gate of every instruction that older GPUs lack."""
    if INTERPRETED or device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= min_capability


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
def _add_nibble_sums(lo, hi, cw, table, w, half, plane):
    """Add the table entries of 4 nibbles of the code words ``cw`` (bits ``16 half`` to ``16 half +
    15`` of word ``w`` of bit-plane ``plane``), times ``2^plane``, to the 16-bit lanes ``lo`` (heads 0,
    2, ..) and ``hi`` (heads 1, 3, ..). Four entries of at most 60 per byte fit a byte; then the bytes
    widen (a lane's total, at most ``15 (2^bits - 1) D`` = 28800 at 4 bits, D 128, fits 16 bits)."""
    acc = tl.zeros_like(lo)
    for k in tl.static_range(4):
        # unsigned: the index needs no sign extension to address
        nib = (cw.to(tl.uint32, bitcast=True) >> (16 * half + 4 * k)) & 15
        acc += tl.load(table + ((w * 8 + half * 4 + k) * 16 + nib))
    if acc.dtype == tl.int64:
        even_bytes = tl.full((), 0x00FF00FF00FF00FF, tl.int64)
    else:
        even_bytes = tl.full((), 0x00FF00FF, tl.int32)
    return lo + ((acc & even_bytes) << plane), hi + (((acc >> 8) & even_bytes) << plane)


@triton.jit
def slot_offsets(slots, OFFS32: tl.constexpr):
    """Slots as the code and factor addresses are computed from them: in 32 bits where the launcher
    found every offset of a kv-head's buffer below 2**31 (``offsets_fit_32``), else 64. A 64-bit
    address costs ~7 instructions (sign extension, wide multiply-adds, carry) where 32 bits cost 3:
    a third of the tensor-core estimate's loop was such arithmetic."""
    if OFFS32:
        return slots.to(tl.int32)
    else:
        return slots.to(tl.int64)


def offsets_fit_32(*buffers) -> bool:
    """Whether every element offset of these buffers, and one past the last, fits a signed 32-bit
    integer. The span is taken through the strides: a view with gaps reaches beyond its element count."""
    return all(1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) < 2**31 for t in buffers)


@triton.jit
def block_logits(
    codes_ptr, factor_ptr, slots, valid, stride_cn, stride_fn,
    table, offs_g, a, b, c,
    D: tl.constexpr, BLOCK_N: tl.constexpr, HW: tl.constexpr, KEY_BITS: tl.constexpr,
):
    """Estimated logits ``[GP, BLOCK_N]`` (query heads x tokens) of the tokens at ``slots``:
    ``g * (a <u, q_u> + b sum(u) + c)`` with the per-head ``(a, b, c)`` of ``logit_constants``, over
    the levels ``u`` of ``KEY_BITS`` bit-planes (one bit: ``u = b``, ``sum(u) = popcount(b)``).

    ``codes_ptr``, ``factor_ptr``: the kv-head's codes and factors (``codes[:, hkv]``, ``factor[:, hkv]``);
    ``slots``: as ``slot_offsets`` gives them. ``table``: the kv-head's ``query_nibble_table`` entries ``[D // 4, 16]``, each one int32 or
    int64 (up to 4 or 8 heads: one load per nibble). ``offs_g = arange(GP)``. Invalid tokens get -inf.
    """
    WORDS: tl.constexpr = D // 32
    code = codes_ptr + slots * stride_cn
    ones = tl.zeros((BLOCK_N,), tl.int32)
    lo = tl.zeros((BLOCK_N,), table.dtype.element_ty)
    hi = tl.zeros((BLOCK_N,), table.dtype.element_ty)
    for j in tl.static_range(KEY_BITS):
        for w in tl.static_range(WORDS):
            # an invalid token's nibbles are 0: entry 0 is 0
            cw = tl.load(code + j * WORDS + w, mask=valid, other=0)
            ones += popcount(cw, HW) << j
            for half in tl.static_range(2):
                lo, hi = _add_nibble_sums(lo, hi, cw, table, w, half, j)
    # head g: lane g // 2 (16 bits each) of lo (g even) or hi (g odd)
    src = tl.where((offs_g % 2 == 0)[:, None], lo[None, :], hi[None, :])
    b_dot_q = ((src >> (16 * (offs_g // 2)).to(src.dtype)[:, None]) & 0xFFFF).to(tl.int32)
    g = tl.load(factor_ptr + slots * stride_fn, mask=valid, other=0.0)
    ip = a[:, None] * b_dot_q.to(tl.float32) + (b[:, None] * ones.to(tl.float32)[None, :] + c[:, None])
    return tl.where(valid[None, :], g[None, :] * ip, float("-inf"))


@triton.jit
def table_entries(table_ptr, b, hkv, HKV, D: tl.constexpr, WPE: tl.constexpr):
    """The start of request ``b``'s kv-head ``hkv`` entries in a ``query_nibble_table`` (int32
    words), as a pointer to whole entries: int32 for groups of up to 4 heads, int64 up to 8."""
    base = (b * HKV + hkv).to(tl.int64) * (D // 4 * 16)
    if WPE == 2:
        return table_ptr.to(tl.pointer_type(tl.int64)) + base
    else:
        return table_ptr + base


@triton.jit
def logit_constants(qscal_ptr, qrows, gmask, sm_scale, D: tl.constexpr, KEY_BITS: tl.constexpr = 1):
    """Per query head ``(a, b, c) [GP]``: the logit ``sm_scale * g * (2 delta <u, q_u> + 2 min sum(u)
    - (2^bits - 1)(delta sum(q_u) + D min))`` is ``g * (a <u, q_u> + b sum(u) + c)``."""
    delta = tl.load(qscal_ptr + qrows * 3 + 0, mask=gmask, other=0.0)
    qmin = tl.load(qscal_ptr + qrows * 3 + 1, mask=gmask, other=0.0)
    qsum = tl.load(qscal_ptr + qrows * 3 + 2, mask=gmask, other=0.0)
    top: tl.constexpr = 2**KEY_BITS - 1
    return 2.0 * delta * sm_scale, 2.0 * qmin * sm_scale, -(delta * qsum + D * qmin) * (top * sm_scale)


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


def table_words(group: int) -> int:
    """int32 words per ``query_nibble_table`` entry: one byte per query head of the group."""
    return (group + 3) // 4
