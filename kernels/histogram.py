"""Warp-cooperative counting of bin indices in [0, 64): the score pass's histogram (reference:
``hist_threshold``'s bin counts) in about 30 instructions per element, where ``tl.histogram`` takes
about 50 (SASS, ``eval/kernel_sass.py``) and synchronizes the program's warps on shared memory.

Per element slot, one ballot per bit of the bin (and one for "in range") gives every lane the bits of
the 32 bins its warp holds there. From those masks alone a lane counts the lanes whose bin is its
*key* or key + 32. An element at position ``i`` of a block has key ``(i // VEC) % 32``: where each
thread holds ``VEC`` consecutive positions of a 1-D block, the 32 elements a warp holds in one slot
have 32 distinct keys, so each bin is counted once per slot, by the lane that owns it, and summing
the counts by key gives the histogram (``counts_by_key``).

That layout is Triton's choice, not ours, so it is checked, not assumed: each call also ORs
``1 << key`` over the warp, all ones exactly when the keys were distinct, and the caller falls back
to ``tl.histogram`` otherwise. (A 1-D block has no element held twice unless threads hold more than
``VEC`` each, and then keys collide as well.) The ballots need the whole warp converged, which
Triton's element-wise code is; the interpreter (CPU tests) runs no PTX and takes ``tl.histogram``
(``BALLOT`` is False there).
"""

import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import INTERPRETED

BALLOT = not INTERPRETED

# $0: bins key and key + 32, counted over the warp (16 bits each); $1: OR of $3 over the warp.
# $2: the bin (in range iff 0 <= bin < 64, unsigned compare); $3: 1 << key; $4-$8: per bit j of the
# key, 0 where it is set and ~0 where not, so that ballot ^ polarity marks the lanes agreeing on bit j.
_MATCH_LOW_BITS = "".join(
    f"and.b32 t, $2, {1 << j};\nsetp.ne.b32 p, t, 0;\nvote.sync.ballot.b32 m, p, -1;\nxor.b32 m, m, ${4 + j};\n"
    "and.b32 c, c, m;\n" for j in range(5))
_BALLOT_COUNTS = tl.constexpr(
    "{\n.reg .pred p;\n.reg .b32 c, m, t;\n"
    "setp.lt.u32 p, $2, 64;\nvote.sync.ballot.b32 c, p, -1;\n"  # c: the lanes whose bin is in range
    + _MATCH_LOW_BITS  # ... and agrees with the key on bits 0-4
    + "and.b32 t, $2, 32;\nsetp.ne.b32 p, t, 0;\nvote.sync.ballot.b32 m, p, -1;\n"
    "and.b32 t, c, m;\nnot.b32 m, m;\nand.b32 c, c, m;\n"  # bit 5 set: key + 32; clear: key
    "popc.b32 t, t;\npopc.b32 c, c;\nshl.b32 t, t, 16;\nor.b32 $0, c, t;\n"
    "redux.sync.or.b32 $1, $3, -1;\n}")


@triton.jit
def key_masks(key):
    """``ballot_counts``'s loop invariants for keys ``key % 32``: ``1 << key`` and per bit j of the key
    0 where it is set, ~0 where not."""
    key = key % 32
    return (1 << key, ((key & 1) != 0) - 1, ((key & 2) != 0) - 1, ((key & 4) != 0) - 1, ((key & 8) != 0) - 1,
            ((key & 16) != 0) - 1)


@triton.jit
def ballot_counts(k, onehot, p0, p1, p2, p3, p4):
    """Per element: how many of the warp's bins ``k`` in this slot are the element's key (low 16 bits)
    and key + 32 (high 16 bits); and the OR of ``onehot`` over the warp (all ones: keys distinct)."""
    return tl.inline_asm_elementwise(
        _BALLOT_COUNTS, "=r,=r,r,r,r,r,r,r,r", [k, onehot, p0, p1, p2, p3, p4],
        dtype=(tl.int32, tl.int32), is_pure=False, pack=1)


@triton.jit
def counts_by_key(acc, N: tl.constexpr, VEC: tl.constexpr):
    """The 64 bins' counts from ``N`` accumulated ``ballot_counts`` of keys ``(position // VEC) % 32``."""
    per_key = tl.sum(tl.sum(tl.reshape(acc, (N // (32 * VEC), 32, VEC)), axis=2), axis=0)  # bins key | key + 32
    halves = (per_key[None, :] >> (16 * tl.arange(0, 2))[:, None]) & 0xFFFF
    return tl.reshape(halves, (64,))
