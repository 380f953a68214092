"""Top-p threshold per (request, query head) from the chunks' histograms: no sort, no host sync
(reference: ``hist_threshold``; the crossing-bin rule is ``crossing_threshold``). With ``prior_lse``
the sink and window's mass counts towards p (top-p over the whole context).

``cap_union`` (``max_budget`` < 1) then caps what each kv-head reads, the union of its query heads'
sets (reference: ``union_cap_thresholds``): one pass over the stored logits histograms each token's
rank ``r`` per chunk, one program per (request, kv-head) merges them and raises its heads' thresholds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate import chunk_bounds, group_pad, logit_rows
from sglang_rabitq.kernels.launch_chain import chain_options, chain_start
from sglang_rabitq.kernels.score import HIST_BLOCK_N, NO_BIN, ChunkStats
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS, SMALL_BIN


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _threshold_kernel(
    cmax_ptr, ctop_ptr, ccount_ptr, thr_ptr, prior_ptr, hmax_ptr, top_p, HQ, NC,
    NCP: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr, BIN_W: tl.constexpr, SMALL: tl.constexpr,
    PRIOR: tl.constexpr, STORE_MAX: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    row = tl.program_id(0) * HQ + tl.program_id(1)
    base = row * NC
    offs_c = tl.arange(0, NCP)
    # Loads that do not wait for one another: at batch 1 this kernel is a chain of memory round
    # trips (one per dependent load), not bandwidth. An empty chunk's top bin is NO_BIN, so the
    # max needs no liveness mask, and its histogram (never written) lands below bin 0, unread.
    m = tl.max(tl.load(cmax_ptr + base + offs_c, mask=offs_c < NC, other=float("-inf")), axis=0)
    top = tl.max(tl.load(ctop_ptr + base + offs_c, mask=offs_c < NC, other=NO_BIN), axis=0)
    any_live = m > float("-inf")
    m0 = tl.where(any_live, m, 0.0)
    offs_j = tl.arange(0, NB)
    # sum the chunks' histograms, re-anchored to the global top bin, CB chunks per 2-D load
    offs_cb = tl.arange(0, CB)
    count = tl.zeros((NB,), tl.int32)
    for c0 in range(0, NC, CB):
        c = c0 + offs_cb
        shift = top - tl.load(ctop_ptr + base + c, mask=c < NC, other=NO_BIN)  # huge for an empty chunk
        src = offs_j[None, :] - shift[:, None]
        take = tl.where(any_live, src, -1) >= 0  # (a scalar & a block: the interpreter refuses it)
        count += tl.sum(tl.load(ccount_ptr + (base + c)[:, None] * NB + src, mask=take, other=0), axis=0)
    # a bin's mass: its count at the bin's middle logit (relative to exp(m))
    mass = count.to(tl.float32) * tl.exp((top - offs_j).to(tl.float32) * BIN_W + 0.5 * BIN_W - m0)
    cum = tl.cumsum(mass, axis=0)
    # what the bins must bring: p of (binned + prior) minus the prior; <= 0 keeps the top bin's rule
    if PRIOR:
        prior = tl.exp(tl.minimum(tl.load(prior_ptr + row) - m0, 80.0))  # relative to exp(m), as the bins
    else:
        prior = 0.0
    target = top_p * tl.sum(mass, axis=0) - (1.0 - top_p) * prior
    k = tl.min(tl.where(cum >= target, offs_j, NB), axis=0)
    at_k = offs_j == k
    bin_mass = tl.sum(tl.where(at_k, mass, 0.0), axis=0)
    above = tl.sum(tl.where(at_k, cum, 0.0), axis=0) - bin_mass
    lo = (top - k).to(tl.float32) * BIN_W
    # inside the crossing bin: interpolate as if its mass were spread evenly in logit ...
    frac = tl.minimum(tl.maximum((target - above) / tl.where(bin_mass > 0, bin_mass, 1.0), 0.0), 1.0)
    e_hi = tl.exp(lo + BIN_W - m0)
    interp = m0 + tl.log(tl.maximum(e_hi - frac * (e_hi - tl.exp(lo - m0)), 1e-30))
    # ... unless it holds few tokens: then keep it whole
    small = tl.sum(tl.where(at_k, count, 0), axis=0) <= SMALL
    thr = tl.minimum(tl.where(small, lo, interp), m0)  # the arg-max is always kept
    # -inf keeps every token: p = 1 or an empty region
    found = any_live & (k < NB) & (top_p < 1.0)
    thr = tl.where(found, thr, float("-inf"))
    tl.store(thr_ptr + row, thr)
    if STORE_MAX:  # for cap_union: the head's largest logit (-inf for an empty region)
        tl.store(hmax_ptr + row, m)


def threshold_constexprs(num_chunks: int) -> dict:
    """The threshold kernel's compile-time arguments for ``num_chunks`` chunks per request."""
    ncp = triton.next_power_of_2(num_chunks)
    # few, wide iterations: CB chunks' [CB, NB] counts per load
    return dict(NCP=ncp, CB=min(128, ncp), NB=HIST_BINS, BIN_W=BIN_WIDTH, SMALL=SMALL_BIN)


def top_p_threshold(
    stats: ChunkStats, thr: torch.Tensor, top_p: float, num_chunks: int, prior_lse: torch.Tensor | None = None,
    head_max: torch.Tensor | None = None,
) -> None:
    """``thr [B, Hq]`` float32: per query head the lowest estimated logit that is kept.
    ``prior_lse [B, Hq]``: log-mass of the always-attended tokens (``prepare_query``), or None.
    ``head_max [B, Hq]``: if given, receives each head's largest logit (for ``cap_union``)."""
    bsz, hq = thr.shape
    _threshold_kernel[(bsz, hq)](
        stats.max, stats.top, stats.count, thr, thr if prior_lse is None else prior_lse,
        thr if head_max is None else head_max, float(top_p), hq, num_chunks,
        PRIOR=prior_lse is not None, STORE_MAX=head_max is not None, **threshold_constexprs(num_chunks),
        **chain_options(thr.device),
    )


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _union_hist_kernel(
    logit_ptr, plan_ptr, thr_ptr, hmax_ptr, ucount_ptr, HQ, HKV, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, HBLOCK: tl.constexpr, NB: tl.constexpr, BIN_W: tl.constexpr,
    PLAN_FIELDS: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    c = tl.program_id(2)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    start, end = chunk_bounds(plan_ptr, b, c, PLAN_FIELDS)
    rows = logit_rows(plan_ptr, b, heads, HQ, NC, PLAN_FIELDS)
    thr = tl.load(thr_ptr + b * HQ + heads, mask=gmask, other=float("inf"))
    m = tl.load(hmax_ptr + b * HQ + heads, mask=gmask, other=0.0)
    m = tl.where(m > float("-inf"), m, 0.0)  # an empty head keeps nothing anyway
    count = tl.zeros((NB,), tl.int32)
    for n0 in range(start, end, HBLOCK):
        pos = n0 + tl.arange(0, HBLOCK)
        valid = pos < end
        lg = tl.load(logit_ptr + rows[:, None] + pos[None, :], mask=gmask[:, None] & valid[None, :],
                     other=float("-inf")).to(tl.float32)
        # a token's rank bin: floor(-r / BIN_W) of its best logit below the max of a head that keeps
        # it, r = max(lg - m), i.e. the least bins_between(m, lg) over those heads
        kept = (lg >= thr[:, None]) & (lg > float("-inf"))
        k = tl.min(tl.where(kept, bins_between(m[:, None], lg, BIN_W), NB), axis=0)
        count += tl.histogram(k, NB, mask=valid & (k < NB))
    tl.store(ucount_ptr + ((b * HKV + hkv) * NC + c) * NB + tl.arange(0, NB), count)


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _union_cap_kernel(
    ucount_ptr, plan_ptr, thr_ptr, hmax_ptr, max_budget, HQ, HKV, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr, BIN_W: tl.constexpr,
    SMALL: tl.constexpr, PLAN_FIELDS: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    base = (b * HKV + hkv) * NC
    offs_j = tl.arange(0, NB)
    offs_cb = tl.arange(0, CB)
    count = tl.zeros((NB,), tl.int32)
    for c0 in range(0, NC, CB):  # absolute bins: the chunks' counts add as they are
        c = c0 + offs_cb
        count += tl.sum(tl.load(ucount_ptr + (base + c)[:, None] * NB + offs_j[None, :], mask=(c < NC)[:, None],
                                other=0), axis=0)
    scored = tl.load(plan_ptr + b * PLAN_FIELDS + 2) - tl.load(plan_ptr + b * PLAN_FIELDS + 1)
    want = tl.ceil(max_budget * scored.to(tl.float32))
    ccum = tl.cumsum(count, axis=0)
    binding = tl.sum(count, axis=0).to(tl.float32) > want
    # the bin where the count from the top reaches want, and the cut inside it as if its tokens were
    # spread evenly (reference: cap_offset)
    kc = tl.min(tl.where(ccum.to(tl.float32) >= want, offs_j, NB), axis=0)
    at_kc = offs_j == kc
    kc_count = tl.sum(tl.where(at_kc, count, 0), axis=0)
    kc_above = tl.sum(tl.where(at_kc, ccum, 0), axis=0) - kc_count
    lo = -(kc + 1).to(tl.float32) * BIN_W
    frac = (want - kc_above.to(tl.float32)) / tl.maximum(kc_count, 1).to(tl.float32)
    tau = tl.where(kc_count <= SMALL, lo, tl.minimum(lo + BIN_W * (1.0 - frac), 0.0))
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GROUP
    rows = b * HQ + hkv * GROUP + offs_g
    thr = tl.load(thr_ptr + rows, mask=gmask, other=0.0)
    m = tl.load(hmax_ptr + rows, mask=gmask, other=0.0)
    tl.store(thr_ptr + rows, tl.where(binding, tl.maximum(thr, m + tau), thr), mask=gmask)


@triton.jit
def bins_between(hi, lo, BIN_W: tl.constexpr):
    """``floor((hi - lo) / BIN_W)`` exactly, for fp16 values ``hi >= lo`` held in fp32, where
    ``hi - lo`` itself can round (a tiny ``hi`` against a large ``lo``: 11-bit significands up to 40
    binades apart) and land on the wrong side of a bin edge: the whole bins of each apart, less
    one where ``lo``'s remainder in its bin exceeds ``hi``'s (both exact: ``BIN_W`` is a power of two)."""
    a = hi / BIN_W
    b = lo / BIN_W
    fa = tl.floor(a)
    fb = tl.floor(b)
    return (fa - fb).to(tl.int32) - ((a - fa) < (b - fb)).to(tl.int32)


def cap_union(
    logits: torch.Tensor, plan: torch.Tensor, thr: torch.Tensor, head_max: torch.Tensor, union_count: torch.Tensor,
    max_budget: float, num_kv_heads: int, num_chunks: int,
) -> None:
    """Raise ``thr [B, Hq]`` so that each kv-head's union of sets holds about ``max_budget`` of its
    scored tokens (unchanged where it holds fewer). ``logits``: the score pass's; ``head_max``:
    ``top_p_threshold``'s; ``union_count``: scratch of at least ``B * Hkv * num_chunks`` rows of bins."""
    bsz, hq = thr.shape
    group = hq // num_kv_heads
    if union_count.shape[0] < bsz * num_kv_heads * num_chunks or union_count.shape[1] != HIST_BINS:
        raise ValueError(f"union_count must be [>= {bsz * num_kv_heads * num_chunks}, {HIST_BINS}]")
    common = dict(GROUP=group, GP=group_pad(group), NB=HIST_BINS, BIN_W=BIN_WIDTH, PLAN_FIELDS=plan.shape[1],
                  **chain_options(thr.device))
    _union_hist_kernel[(bsz, num_kv_heads, num_chunks)](
        logits, plan, thr, head_max, union_count, hq, num_kv_heads, num_chunks, HBLOCK=HIST_BLOCK_N, **common)
    _union_cap_kernel[(bsz, num_kv_heads)](
        union_count, plan, thr, head_max, float(max_budget), hq, num_kv_heads, num_chunks,
        CB=threshold_constexprs(num_chunks)["CB"], SMALL=SMALL_BIN, **common)
