"""Top-p token selection from estimated logits.

``top_p_mask`` states the semantics: the smallest set of tokens whose softmax mass reaches ``p``
(ties broken towards the lower index; the arg-max is always kept; ``p = 1`` keeps every token).
``prior_lse`` (per row, optional) is the log-mass of tokens kept anyway and not in the row (the
sink and window, attended exactly): the kept set then only has to bring the kept mass, prior
included, to ``p`` of the total, prior included.

``hist_threshold`` / ``top_p_mask_hist`` are what the kernels compute without a sort. Logits fall
into ``HIST_BINS`` bins of width ``BIN_WIDTH`` on an absolute grid, counted down from the maximum's
bin; each bin counts its tokens and weighs them at its middle logit (within 1/8 logit of each:
counting is what GPUs histogram fast). Bins are taken from the top until the cumulative mass would
pass ``p`` of the binned total; inside that last bin the threshold is interpolated
as if its mass were spread evenly in logit, except that a bin of at most ``SMALL_BIN`` tokens is
kept whole (with few tokens the even-spread guess can cut off most of the bin's mass). The
threshold never exceeds the maximum, so the arg-max is always kept. Tokens more than
``HIST_BINS * BIN_WIDTH`` below the maximum (mass under ``exp(-16)`` each) are never kept.

``max_budget`` (< 1) caps what a kv-head reads, the union of its query heads' sets, at about
``want = ceil(max_budget * n)`` of its ``n`` scored tokens. A token's rank is its best estimated
weight relative to the top weight of a head that keeps it, ``r(t) = max(x_h(t) - m_h)`` over the
heads ``h`` whose set holds ``t`` (``m_h``: head ``h``'s largest logit), so each head's own top
tokens come first whatever its scale. The exact rule (``union_cap_mask``) keeps the ``want`` tokens
of the union with the highest ``r``; the histogram rule (``union_cap_thresholds``) bins ``r`` below 0
in bins of ``BIN_WIDTH``, finds the bin where the count from the top reaches ``want``, places the cut
``tau`` in it as if its tokens were spread evenly (a bin of at most ``SMALL_BIN`` tokens is kept
whole), and raises every head's threshold to ``max(thr_h, m_h + tau)``. A cap bounds the work of
flat heads, where top-p alone keeps nearly everything. A threshold keeps tied logits together: a head
whose stored logits are all equal keeps every token under any cap.
"""

from __future__ import annotations

import math

import torch

from sglang_rabitq.validation import check_fraction

BIN_WIDTH = 0.25  # logit units per bin
HIST_BINS = 64  # bins counted down from the maximum's: 16 logit units
SMALL_BIN = 16  # a crossing bin with at most this many tokens is kept whole
LOGIT_STORAGE_DTYPE = torch.float16  # the kernels store estimated logits, and select from them, in this


def _masked_logits(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    x = logits.to(torch.float64)
    if valid is not None:
        x = x.masked_fill(~valid, float("-inf"))
    return x


def _prior_mass(x: torch.Tensor, prior_lse: torch.Tensor | None) -> torch.Tensor:
    """Per row, the prior's mass relative to the row's own (finite) mass: ``[R, 1]`` float64."""
    if prior_lse is None:
        return torch.zeros(x.shape[0], 1, dtype=torch.float64, device=x.device)
    lse = torch.logsumexp(x, -1)
    rel = torch.exp(prior_lse.to(device=x.device, dtype=torch.float64) - lse)
    return torch.where(torch.isfinite(lse), rel, 0.0)[:, None]


def cap_count(max_budget: float, n: int) -> int:
    """Tokens a kv-head of ``n`` scored tokens keeps at most under ``max_budget``: ``ceil`` in float32,
    as the kernel."""
    return math.ceil(float(torch.tensor(max_budget, dtype=torch.float32) * torch.tensor(float(n), dtype=torch.float32)))


def top_p_mask(
    logits: torch.Tensor, p: float, valid: torch.Tensor | None = None, prior_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimal top-p set per row of ``logits [R, N]`` (exact, by sort + cumsum)."""
    check_fraction(top_p=p)
    x = _masked_logits(logits, valid)
    has_any = torch.isfinite(x).any(-1, keepdim=True)
    if p >= 1.0:
        return torch.isfinite(x) & has_any
    # stable descending sort: among equal logits the lower index comes first
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    sorted_x = torch.gather(x, -1, order)
    finite = torch.isfinite(sorted_x)
    probs = torch.softmax(sorted_x, dim=-1)
    before = torch.cumsum(probs, -1) - probs  # mass strictly before each sorted entry
    prior = _prior_mass(x, prior_lse)
    # kept while (prior + before) < p (prior + 1), written so that an infinite prior keeps nothing
    keep_sorted = finite & (p - before > (1.0 - p) * prior)
    keep_sorted[:, 0] |= has_any[:, 0]  # the arg-max
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(-1, order, keep_sorted)
    return mask & has_any


def crossing_threshold(
    top_bin: int, k: int, mass_above: float, bin_mass: float, bin_count: int, target: float, m: float
) -> float:
    """Logit threshold inside bin ``k`` (counted down from ``top_bin``) reaching ``target`` mass.

    Masses are relative to ``exp(m)``. Shared by the reference and the kernels' host-side tests.
    """
    lo = (top_bin - k) * BIN_WIDTH
    if bin_count <= SMALL_BIN:
        return min(lo, m)
    hi = lo + BIN_WIDTH
    frac = min(max((target - mass_above) / bin_mass, 0.0), 1.0)
    e_hi, e_lo = math.exp(hi - m), math.exp(lo - m)
    return min(m + math.log(e_hi - frac * (e_hi - e_lo)), m)


def cap_offset(k: int, count_above: int, bin_count: int, want: int) -> float:
    """The cut ``tau <= 0`` inside bin ``k`` of ``r`` (bin ``k`` holds ``-(k + 1) W < r <= -k W``) above
    which about ``want`` tokens lie, ``count_above`` of them in the bins above."""
    lo = -(k + 1) * BIN_WIDTH
    if bin_count <= SMALL_BIN:
        return lo
    frac = (want - count_above) / bin_count  # of the bin's tokens, from its top
    return min(lo + BIN_WIDTH * (1.0 - frac), 0.0)


def _union_rank(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``r [N]``: per token the largest ``x_h - m_h`` over the heads (rows of ``x [G, N]``) whose
    ``keep`` holds it; ``-inf`` where none does."""
    if x.shape[1] == 0:
        return x.new_empty(0)
    m = x.masked_fill(~torch.isfinite(x), float("-inf")).max(-1, keepdim=True).values
    rel = torch.where(keep & torch.isfinite(x), x - torch.where(torch.isfinite(m), m, 0.0), float("-inf"))
    return rel.max(0).values


def union_cap_mask(logits: torch.Tensor, masks: torch.Tensor, max_budget: float, n: int | None = None) -> torch.Tensor:
    """Exact rule: of the union of a kv-head's sets ``masks [G, N]`` over ``logits [G, N]``, the at most
    ``ceil(max_budget * n)`` tokens of highest rank (ties towards the lower index); ``n``: scored
    tokens (default ``N``). Returns ``[N]`` bool."""
    check_fraction(max_budget=max_budget)
    r = _union_rank(logits.to(torch.float64), masks)
    union = torch.isfinite(r)
    want = cap_count(max_budget, logits.shape[1] if n is None else n)
    if int(union.sum()) <= want:
        return union
    order = torch.sort(r, descending=True, stable=True).indices[:want]
    out = torch.zeros_like(union)
    out[order] = True
    return out


def union_cap_thresholds(logits: torch.Tensor, thr: torch.Tensor, max_budget: float, n: int | None = None) -> torch.Tensor:
    """Histogram rule: a kv-head's thresholds ``thr [G]`` (float64) raised so that the union of its
    sets over ``logits [G, N]`` holds about ``ceil(max_budget * n)`` tokens (unchanged when it holds
    no more). ``n``: scored tokens (default ``N``)."""
    check_fraction(max_budget=max_budget)
    x = logits.to(torch.float64)
    thr = thr.to(torch.float64).cpu()
    r = _union_rank(x, x >= thr[:, None])
    live = torch.isfinite(r)
    k = torch.floor(-r[live] / BIN_WIDTH).to(torch.int64)
    count = torch.bincount(k[k < HIST_BINS], minlength=HIST_BINS)
    want = cap_count(max_budget, x.shape[1] if n is None else n)
    if int(count.sum()) <= want:
        return thr
    ccum = torch.cumsum(count, 0)
    kc = int(torch.nonzero(ccum >= want)[0])
    tau = cap_offset(kc, int(ccum[kc] - count[kc]), int(count[kc]), want)
    m = x.masked_fill(~torch.isfinite(x), float("-inf")).max(-1).values
    return torch.maximum(thr, m + tau)


def hist_threshold(
    logits: torch.Tensor, p: float, valid: torch.Tensor | None = None, prior_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row of ``logits [R, N]``, the logit threshold kept (``-inf`` keeps every token)."""
    check_fraction(top_p=p)
    x = _masked_logits(logits, valid)
    prior = None if prior_lse is None else prior_lse.to(torch.float64).cpu()
    out = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64)
    if p >= 1.0:
        return out
    for r in range(x.shape[0]):
        row = x[r][torch.isfinite(x[r])]
        if row.numel() == 0:
            continue
        m = float(row.max())
        top = math.floor(m / BIN_WIDTH)
        k = top - torch.floor(row / BIN_WIDTH).to(torch.int64)
        count = torch.bincount(k[k < HIST_BINS], minlength=HIST_BINS)
        # a bin's mass: its count at the bin's middle logit (the kernels histogram counts only)
        mids = (top - torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) * BIN_WIDTH
        mass = count.double() * torch.exp(mids - m)
        cum = torch.cumsum(mass, 0)
        # what the bins must bring: p of (binned + prior) minus the prior (<= 0: the top bin's rule)
        pm = 0.0 if prior is None else math.exp(min(float(prior[r]) - m, 700.0))
        target = p * float(mass.sum()) - (1.0 - p) * pm
        hit = torch.nonzero(cum >= target)
        if hit.numel():
            kk = int(hit[0])
            out[r] = crossing_threshold(
                top, kk, float(cum[kk] - mass[kk]), float(mass[kk]), int(count[kk]), target, m
            )
    return out


def top_p_mask_hist(
    logits: torch.Tensor, p: float, valid: torch.Tensor | None = None, prior_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernels' histogram top-p selection, per row of ``logits [R, N]``."""
    thr = hist_threshold(logits, p, valid, prior_lse).to(logits.device)
    x = _masked_logits(logits, valid)
    return (x >= thr[:, None]) & torch.isfinite(x)
