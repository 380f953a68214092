"""The binary x INT4 estimate on the tensor cores (reference: ``estimate_int`` times the softmax
scale): ``<b, q_u> = sum_j 2^j popcount(b AND plane_j)`` as a 1-bit matrix product,
``mma.sync.m16n8k128 .b1 .and.popc``, whose 16 x 8 outputs are the popcounts of 16 code rows ANDed
with 8 query bit-planes over 128 bits. On an H100 it counts ~10x the bits of the popcount
instruction per second (``eval/bmma_probe.py``). The sums are exact integers, so this path and the
nibble table (``kernels.estimate``) give the same ``<b, q_u>``.

A warp's tile is 16 tokens (rows: their code words, zero-padded to 128 bits at D 64) by 2 query
heads x 4 planes (columns), so a kv-head's group takes ``ceil(group / 2)`` MMAs per 16 tokens. The
operands sit in registers in the layout the instruction defines per lane (``groupID = lane / 4``,
``tig = lane % 4``): A holds word ``tig`` of tokens ``groupID`` and ``groupID + 8``; B word ``tig`` of
column ``groupID``; the result, columns ``2 tig`` and ``2 tig + 1`` of both rows. Each lane then
weights its two planes, and trades one row with the lane of the other two planes of its head, so that
each lane ends with one (token, head) estimate. Key codes of several bits per dimension take one such
MMA per key bit-plane, summed with weights ``2^j`` (exact integers still).

That per-lane layout is built from the thread index (``%tid.x``) inside tensors of one element per
thread (``32 * num_warps`` elements, loaded through computed, non-contiguous addresses, which Triton
lays out one per thread). ``tests/test_kernel_sass.py`` checks the compiled loop holds one MMA per
head pair and tile, i.e. that no thread held two elements. The interpreter (CPU tests) runs no PTX and takes the
nibble table (``MMA`` is False there).
"""

import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import INTERPRETED, logit_constants, popcount, slot_offsets

MMA = not INTERPRETED
MMA_TOKENS = tl.constexpr(16)  # tokens (rows) of one warp's tile
# tiles per warp an iteration, loaded together: with one, the score launch was load-latency bound
# (Llama-3.1-8B shape, 32K, batch 32, H100: 346 us at 1, 299 at 2, 247 at 4, 275 at 8 tiles)
MMA_ROUNDS = 4

# $1, $2: A (word tig of rows groupID, groupID + 8); $3: B (word tig of column groupID);
# $4: tig & 1, i.e. the lane holds planes 2-3 (weights 4, 8) rather than 0-1 (1, 2).
# $0: <b, q_u> of the lane's (token, head): row groupID on even lanes, groupID + 8 on odd ones.
_MMA_DOT = tl.constexpr(
    "{\n.reg .b32 c0, c1, c2, c3, s, k;\n.reg .pred odd;\n"
    "mov.b32 c0, 0;\nmov.b32 c1, 0;\nmov.b32 c2, 0;\nmov.b32 c3, 0;\n"
    "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {c0, c1, c2, c3}, {$1, $2}, {$3}, {c0, c1, c2, c3};\n"
    "setp.ne.b32 odd, $4, 0;\n"
    "mad.lo.s32 c0, c1, 2, c0;\nmad.lo.s32 c2, c3, 2, c2;\n"  # planes (0, 1) or (2, 3) of rows g, g + 8
    "@odd shl.b32 c0, c0, 2;\n@odd shl.b32 c2, c2, 2;\n"
    "selp.b32 s, c0, c2, odd;\nselp.b32 k, c2, c0, odd;\n"  # keep one row, send the other
    "shfl.sync.bfly.b32 s, s, 1, 31, -1;\n"
    "add.s32 $0, k, s;\n}")

# $1, $2: popcounts of word tig of rows groupID, groupID + 8; $3: tig & 1. $0: the code's popcount of
# the lane's token (summed over the 4 lanes of its group).
_ROW_SUM = tl.constexpr(
    "{\n.reg .b32 s, t;\n.reg .pred odd;\n"
    "shfl.sync.bfly.b32 s, $1, 1, 31, -1;\nadd.s32 s, s, $1;\n"
    "shfl.sync.bfly.b32 t, s, 2, 31, -1;\nadd.s32 s, s, t;\n"
    "shfl.sync.bfly.b32 t, $2, 1, 31, -1;\nadd.s32 t, t, $2;\n"
    "shfl.sync.bfly.b32 $0, t, 2, 31, -1;\nadd.s32 t, t, $0;\n"
    "setp.ne.b32 odd, $3, 0;\nselp.b32 $0, t, s, odd;\n}")


@triton.jit
def thread_index(W: tl.constexpr):
    """``[32 W]`` int32: the index of the thread that holds each element (one element per thread)."""
    carrier = tl.arange(0, 32 * W)
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [carrier], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def plane_fragments(table, lane, GROUP: tl.constexpr, D: tl.constexpr, NT: tl.constexpr):
    """B operands of the ``NT`` tiles: per lane, word ``tig`` of bit-plane ``groupID % 4`` of head
    ``2 t + groupID // 4`` of the group (0 past the group or past D), read from the kv-head's
    ``query_nibble_table`` entries ``table`` (entry ``[p, 1 << i]`` holds ``q_u[4 p + i]``, a byte a head)."""
    g = lane // 4
    tig = lane % 4
    in_d = tig < D // 32
    frags = ()
    for t in tl.static_range(NT):
        head = 2 * t + g // 4
        word = tl.zeros_like(lane)
        for i in tl.static_range(32):
            e = tl.load(table + (tig * 8 + i // 4) * 16 + (1 << (i % 4)), mask=in_d, other=0)
            level = ((e >> (8 * head).to(e.dtype)) & 15).to(tl.int32)
            word |= ((level >> (g % 4)) & 1) << i
        frags = frags + (tl.where(head < GROUP, word, 0),)
    return frags


@triton.jit
def mma_dot(a0, a1, b, odd):
    """``<b, q_u>`` of each lane's (token, head) in one column tile (``_MMA_DOT``)."""
    return tl.inline_asm_elementwise(_MMA_DOT, "=r,r,r,r,r", [a0, a1, b, odd], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def row_popcount(a0, a1, odd):
    """``popcount(b)`` of each lane's token: its code words' popcounts summed over the lane's group."""
    return tl.inline_asm_elementwise(_ROW_SUM, "=r,r,r,r", [popcount(a0, True), popcount(a1, True), odd],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _round_slots(r2t_row, n0, row_a, end, W: tl.constexpr, R: tl.constexpr, OFFS32: tl.constexpr):
    """Per tile of the round at ``n0``: (the lane's row position, the slots of rows ``groupID`` and
    ``groupID + 8``); 0 past ``end``."""
    tiles = ()
    for r in tl.static_range(R):
        pos_a = n0 + r * MMA_TOKENS * W + row_a
        slot_a = slot_offsets(tl.load(r2t_row + pos_a, mask=pos_a < end, other=0), OFFS32)
        slot_b = slot_offsets(tl.load(r2t_row + pos_a + 8, mask=pos_a + 8 < end, other=0), OFFS32)
        tiles = tiles + ((pos_a, slot_a, slot_b),)
    return tiles


@triton.jit
def _round_words(codes_ptr, factor_ptr, tiles, stride_cn, stride_fn, tig, odd, in_d, D: tl.constexpr,
                 R: tl.constexpr, KEY_BITS: tl.constexpr):
    """Per tile: the A words (``tig`` of both rows) of each bit-plane, the factor and position of the
    lane's own token. Unmasked: a row past the chunk's end has slot 0 (its slot load was masked), a slot
    of the pool, and its estimate is never stored; only the padding words of a row shorter than 128 bits
    must be 0."""
    WORDS: tl.constexpr = D // 32
    words = ()
    for r in tl.static_range(R):
        pos_a, slot_a, slot_b = tiles[r]
        planes = ()
        for j in tl.static_range(KEY_BITS):
            if D >= 128:
                a0 = tl.load(codes_ptr + slot_a * stride_cn + j * WORDS + tig)
                a1 = tl.load(codes_ptr + slot_b * stride_cn + j * WORDS + tig)
            else:
                a0 = tl.load(codes_ptr + slot_a * stride_cn + j * WORDS + tig, mask=in_d, other=0)
                a1 = tl.load(codes_ptr + slot_b * stride_cn + j * WORDS + tig, mask=in_d, other=0)
            planes = planes + ((a0, a1),)
        pos = pos_a + 8 * odd  # the lane's own token
        gf = tl.load(factor_ptr + tl.where(odd == 1, slot_b, slot_a) * stride_fn)
        words = words + ((planes, gf, pos),)
    return words


@triton.jit
def mma_chunk_logits(
    codes_ptr, factor_ptr, r2t_row, logit_base, head_row, qscal_ptr, table, start, end, b, hkv, HQ,
    stride_cn, stride_fn, sm_scale,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
    AHEAD: tl.constexpr, OFFS32: tl.constexpr, KEY_BITS: tl.constexpr = 1,
):
    """Estimated logits of a chunk ``[start, end)`` of request ``b``'s scored region for every query
    head of kv-head ``hkv``, stored in fp16 where ``logit_rows`` puts them; returns their max per head
    ``[GP]`` (-inf where none).

    ``r2t_row``: the request's ``req_to_token`` row; ``codes_ptr``, ``factor_ptr``: the kv-head's codes
    and factors (``codes[:, hkv]``, ``factor[:, hkv]``); ``logit_base``: where the group's first head's
    logit of position 0 goes (``logit_rows``), each further head ``head_row`` logits on; ``table``: its
    kv-head's nibble-table entries. ``OFFS32``: ``slot_offsets``.
    The logit is ``g * (a <u, q_u> + b sum(u) + c)`` as in ``estimate.block_logits``: codes of
    ``KEY_BITS`` bit-planes take one MMA a plane, weighted ``2^j``.
    ``AHEAD``: the next round's slots load beside this round's code words (software pipelining of
    the gather slot -> code word), else each round waits on both in turn."""
    NT: tl.constexpr = (GROUP + 1) // 2
    STEP: tl.constexpr = MMA_TOKENS * W * R
    tid = thread_index(W)
    lane = tid % 32
    g = lane // 4
    tig = lane % 4
    odd = tig % 2
    frags = plane_fragments(table, lane, GROUP, D, NT)
    # the lane's output: token row g + 8 (tig & 1) of each of its warp's tiles, head 2 t + tig // 2 of
    # column tile t; the W warps' tiles are consecutive, R such rounds an iteration
    row_a = (tid // 32) * MMA_TOKENS + g
    in_d = tig < D // 32
    consts = ()
    maxes = ()
    for t in tl.static_range(NT):
        head = 2 * t + tig // 2
        ka, kb, kc = logit_constants(qscal_ptr, b * HQ + hkv * GROUP + head, head < GROUP, sm_scale, D, KEY_BITS)
        consts = consts + ((ka, kb, kc, head * head_row),)
        maxes = maxes + (tl.full((32 * W,), float("-inf"), tl.float32),)
    if AHEAD:
        tiles = _round_slots(r2t_row, start, row_a, end, W, R, OFFS32)
    # all of a round's loads go out before its first MMA
    for n0 in range(start, end, STEP):
        if AHEAD:  # this round's slots came with the round before; the next round's load beside its code words
            this = _round_words(codes_ptr, factor_ptr, tiles, stride_cn, stride_fn, tig, odd, in_d, D, R, KEY_BITS)
            tiles = _round_slots(r2t_row, n0 + STEP, row_a, end, W, R, OFFS32)
        else:  # two memory round trips a round: its slots, then its code words
            this = _round_words(codes_ptr, factor_ptr, _round_slots(r2t_row, n0, row_a, end, W, R, OFFS32),
                                stride_cn, stride_fn, tig, odd, in_d, D, R, KEY_BITS)
        for r in tl.static_range(R):
            planes, gf, pos = this[r]
            valid = pos < end
            ones = tl.zeros_like(odd)
            for j in tl.static_range(KEY_BITS):
                ones += row_popcount(planes[j][0], planes[j][1], odd) << j
            ones = ones.to(tl.float32)
            new_maxes = ()
            for t in tl.static_range(NT):
                ka, kb, kc, row = consts[t]
                dot = tl.zeros_like(odd)
                for j in tl.static_range(KEY_BITS):
                    dot += mma_dot(planes[j][0], planes[j][1], frags[t], odd) << j
                lg = tl.where(valid, gf * (ka * dot.to(tl.float32) + (kb * ones + kc)), float("-inf")).to(tl.float16)
                head = 2 * t + tig // 2
                tl.store(logit_base + (row + pos), lg, mask=valid & (head < GROUP))
                new_maxes = new_maxes + (tl.maximum(maxes[t], lg.to(tl.float32)),)
            maxes = new_maxes
    offs_g = tl.arange(0, GP)
    m = tl.full((GP,), float("-inf"), tl.float32)
    for t in tl.static_range(NT):
        for half in tl.static_range(2):
            if 2 * t + half < GROUP:
                mh = tl.max(tl.where(tig // 2 == half, maxes[t], float("-inf")), axis=0)
                m = tl.where(offs_g == 2 * t + half, mh, m)
    return m
