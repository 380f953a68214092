"""Top-p threshold per (request, query head) from the chunks' histograms: no sort, no host sync
(reference: ``hist_threshold``; the crossing-bin rule is ``crossing_threshold``). With ``prior_lse``
the sink and window's mass counts towards p (top-p over the whole context); ``max_budget`` < 1 caps
each head's set at about that fraction of its tokens (reference: ``cap_threshold``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.score import NO_BIN, ChunkStats
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS, SMALL_BIN


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _threshold_kernel(
    cmax_ptr, ctop_ptr, ccount_ptr, thr_ptr, prior_ptr, top_p, max_budget, HQ, NC,
    NCP: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr, BIN_W: tl.constexpr, SMALL: tl.constexpr,
    PRIOR: tl.constexpr, CAP: tl.constexpr,
):
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
    if CAP:
        # the count cap: the bin where the tokens counted from the top reach ceil(max_budget * n),
        # and inside it the logit above which that many lie if its tokens are spread evenly
        ccum = tl.cumsum(count, axis=0)
        want = tl.ceil(max_budget * tl.sum(count, axis=0).to(tl.float32))
        kc = tl.min(tl.where(ccum.to(tl.float32) >= want, offs_j, NB), axis=0)
        at_kc = offs_j == kc
        kc_count = tl.sum(tl.where(at_kc, count, 0), axis=0)
        kc_above = tl.sum(tl.where(at_kc, ccum, 0), axis=0) - kc_count
        lo_c = (top - kc).to(tl.float32) * BIN_W
        frac_c = (want - kc_above.to(tl.float32)) / tl.maximum(kc_count, 1).to(tl.float32)
        thr_c = tl.minimum(tl.where(kc_count <= SMALL, lo_c, lo_c + BIN_W * (1.0 - frac_c)), m0)
        thr = tl.where(any_live, tl.maximum(thr, thr_c), thr)
    tl.store(thr_ptr + row, thr)


def threshold_constexprs(num_chunks: int) -> dict:
    """The threshold kernel's compile-time arguments for ``num_chunks`` chunks per request."""
    ncp = triton.next_power_of_2(num_chunks)
    # few, wide iterations: CB chunks' [CB, NB] counts per load
    return dict(NCP=ncp, CB=min(128, ncp), NB=HIST_BINS, BIN_W=BIN_WIDTH, SMALL=SMALL_BIN)


def top_p_threshold(
    stats: ChunkStats, thr: torch.Tensor, top_p: float, num_chunks: int, prior_lse: torch.Tensor | None = None,
    max_budget: float = 1.0,
) -> None:
    """``thr [B, Hq]`` float32: per query head the lowest estimated logit that is kept.
    ``prior_lse [B, Hq]``: log-mass of the always-attended tokens (``prepare_query``), or None."""
    bsz, hq = thr.shape
    _threshold_kernel[(bsz, hq)](
        stats.max, stats.top, stats.count, thr, thr if prior_lse is None else prior_lse, float(top_p),
        float(max_budget), hq, num_chunks,
        PRIOR=prior_lse is not None, CAP=max_budget < 1.0, **threshold_constexprs(num_chunks),
    )
