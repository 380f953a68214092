import math

import pytest
import torch

from sglang_rabitq.reference import hist_threshold, top_p_mask, top_p_mask_hist, union_cap_mask, union_cap_thresholds
from sglang_rabitq.reference.decode import decode_regions
from sglang_rabitq.reference.select import BIN_WIDTH


def minimal_set_size(logits: torch.Tensor, p: float) -> int:
    probs = torch.softmax(logits.double(), -1).sort(descending=True).values
    return int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor([p], dtype=torch.float64)).item()) + 1


@pytest.mark.parametrize("p", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_top_p_is_minimal_and_holds_mass(p, fresh_seed):
    logits = torch.randn(6, 300) * 3
    mask = top_p_mask(logits, p)
    probs = torch.softmax(logits.double(), -1)
    for r in range(6):
        kept = mask[r].sum().item()
        assert kept == min(minimal_set_size(logits[r], p), 300)
        assert probs[r][mask[r]].sum() >= p - 1e-12
        # every kept token outweighs every dropped one
        if kept < 300:
            assert probs[r][mask[r]].min() >= probs[r][~mask[r]].max()
        assert mask[r][logits[r].argmax()]


@pytest.mark.parametrize("p", [0.5, 0.9, 0.95])
def test_top_p_with_prior_is_the_minimal_set_of_the_whole(p, fresh_seed):
    # a prior is mass kept outside the row: the row then only has to make up the rest of p of the
    # whole; stated as the minimal top-p set of the row with the prior's mass as one more (kept) entry
    logits = torch.randn(6, 300) * 3
    prior = torch.logsumexp(logits.double(), -1) + torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0, float("-inf")])
    mask = top_p_mask(logits, p, prior_lse=prior)
    for r in range(6):
        whole = torch.softmax(torch.cat([logits[r].double(), prior[r : r + 1]]), -1)
        need = p - float(whole[-1])  # what the row must bring
        order = whole[:-1].argsort(descending=True, stable=True)
        before = torch.cumsum(whole[:-1][order], 0) - whole[:-1][order]
        expect = max(1, int((before < need).sum()))  # the arg-max always stays
        assert int(mask[r].sum()) == expect, (r, int(mask[r].sum()), expect)
        assert mask[r][logits[r].argmax()]
    # no prior and a -inf prior are the plain rule
    assert torch.equal(top_p_mask(logits, p, prior_lse=torch.full((6,), float("-inf"))), top_p_mask(logits, p))


@pytest.mark.parametrize("p", [0.8, 0.95])
def test_hist_with_prior_keeps_near_p_of_the_whole(p, fresh_seed):
    logits = torch.randn(8, 2000) * 2.0
    row_lse = torch.logsumexp(logits.double(), -1)
    prior = row_lse + torch.linspace(-4.0, 2.0, 8, dtype=torch.float64)
    hist = top_p_mask_hist(logits, p, prior_lse=prior)
    exact = top_p_mask(logits, p, prior_lse=prior)
    for r in range(8):
        total = torch.logsumexp(torch.stack([row_lse[r], prior[r]]), 0)
        kept = torch.exp(torch.logsumexp(torch.cat([logits[r].double()[hist[r]], prior[r : r + 1]]), 0) - total)
        assert kept >= p - 0.025, (r, float(kept))
        assert abs(int(hist[r].sum()) - int(exact[r].sum())) <= 0.05 * int(exact[r].sum()) + 16
    # a prior far above the row keeps the arg-max (and at most the top bin's few tokens)
    huge = top_p_mask_hist(logits, p, prior_lse=row_lse + 50.0)
    assert huge[torch.arange(8), logits.argmax(-1)].all() and (huge.sum(-1) <= 16).all()
    assert torch.equal(top_p_mask(logits, p, prior_lse=row_lse + 50.0).sum(-1), torch.ones(8, dtype=torch.long))


def test_top_p_ties_take_lower_index():
    logits = torch.zeros(1, 10)  # uniform: need 5 tokens for p = 0.5, the first five
    assert top_p_mask(logits, 0.5)[0].tolist() == [True] * 5 + [False] * 5
    logits = torch.tensor([[0.0, 5.0, 5.0, 5.0, 0.0]])
    mask = top_p_mask(logits, 0.6)[0]
    assert mask.tolist() == [False, True, True, False, False]


def test_top_p_degenerate_rows():
    dominant = torch.tensor([[0.0] * 20 + [60.0] + [0.0] * 20])
    assert top_p_mask(dominant, 0.99)[0].nonzero().view(-1).tolist() == [20]
    uniform = torch.zeros(1, 64)
    assert top_p_mask(uniform, 1.0).all() and top_p_mask_hist(uniform, 1.0).all()
    assert top_p_mask(uniform, 0.25).sum() == 16
    single = torch.tensor([[3.0]])
    assert top_p_mask(single, 0.1).all() and top_p_mask_hist(single, 0.1).all()
    empty_row = torch.zeros(1, 4)
    valid = torch.zeros(1, 4, dtype=torch.bool)
    assert not top_p_mask(empty_row, 0.9, valid).any() and not top_p_mask_hist(empty_row, 0.9, valid).any()


def test_top_p_respects_valid_mask():
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.0]])
    valid = torch.tensor([[False, True, True, True]])
    assert top_p_mask(logits, 0.9, valid)[0].tolist() == [False, False, True, False]


@pytest.mark.parametrize("p", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_hist_selection_is_a_near_minimal_superset(p, scale, fresh_seed):
    logits = torch.randn(8, 2000) * scale
    exact = top_p_mask(logits, p)
    hist = top_p_mask_hist(logits, p)
    probs = torch.softmax(logits.double(), -1)
    for r in range(8):
        # bins weigh their tokens at the bin's middle logit (each within exp(+-1/8)) and the crossing
        # bin is interpolated: the kept mass may miss p a little (worst seen over 320 rows: 0.018)
        assert probs[r][hist[r]].sum() >= p - 0.025
        # a threshold set: it contains the minimal set or is contained in it
        assert not (exact[r] & ~hist[r]).any() or not (hist[r] & ~exact[r]).any()
        # near-minimal: off by part of one bin (width 1/4) at most
        assert abs(int(hist[r].sum()) - int(exact[r].sum())) <= 0.05 * int(exact[r].sum()) + 16


def _rank(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per token, the best ``x_h - max_h`` over the heads that keep it (-inf: none does)."""
    x = logits.double()
    rel = torch.where(keep, x - x.max(-1, keepdim=True).values, float("-inf"))
    return rel.max(0).values


@pytest.mark.parametrize("p", [0.9, 1.0])
@pytest.mark.parametrize("cap", [0.03, 0.2])
@pytest.mark.parametrize("group", [1, 4])
def test_union_cap_keeps_the_highest_ranked_tokens_of_the_union(p, cap, group, fresh_seed):
    # flat heads (top-p alone keeps most tokens) on different scales: ranks are relative to each head's max
    logits = torch.randn(group, 500) * 0.5 * torch.linspace(0.5, 2.0, group)[:, None]
    masks = top_p_mask(logits, p)
    union, capped = masks.any(0), union_cap_mask(logits, masks, cap)
    want = math.ceil(cap * 500)
    assert int(capped.sum()) == min(int(union.sum()), want)
    assert not (capped & ~union).any()
    r = _rank(logits, masks)
    assert r[capped].min() >= r[union & ~capped].max()
    if group == 1:  # one head: the top of its set by logit
        assert logits[0][capped].min() >= logits[0][union & ~capped].max()
    assert torch.equal(union_cap_mask(logits, masks, cap, n=10**6), union)  # a cap above the union: no change


@pytest.mark.parametrize("p", [0.9, 1.0])
@pytest.mark.parametrize("cap", [0.03, 0.2])
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_union_cap_hist_cuts_inside_the_bin_of_the_want_th_ranked_token(p, cap, scale, fresh_seed):
    logits = torch.randn(4, 4000) * scale * torch.tensor([1.0, 0.5, 2.0, 1.0])[:, None]
    x = logits.double()
    thr = hist_threshold(logits, p)
    capped_thr = union_cap_thresholds(logits, thr, cap)
    union, capped = (x >= thr[:, None]).any(0), (x >= capped_thr[:, None]).any(0)
    want = math.ceil(cap * 4000)
    assert (capped_thr >= thr).all()  # higher thresholds: a subset
    assert not (capped & ~union).any()
    assert capped[x.argmax(-1)].all()  # every head's arg-max (rank 0)
    if int(union.sum()) <= want:
        assert torch.equal(capped_thr, thr)
        return
    # every token of a rank bin above the want-th ranked token's bin is kept, none of a bin below
    r = _rank(logits, x >= thr[:, None])
    bins = torch.floor(-r / BIN_WIDTH)
    edge = bins[union].sort().values[want - 1]
    assert capped[union & (bins < edge)].all() and not capped[bins > edge].any()


def test_union_cap_hist_keeps_the_cap_where_ranks_spread_evenly():
    up = torch.linspace(0.0, 4.0, 8000)
    logits = torch.stack([up, 4.0 - up])  # two heads, opposite ends: 1000 tokens per rank bin down to -2
    thr = torch.full((2,), float("-inf"), dtype=torch.float64)  # top-p 1: the cap alone selects
    for cap in (0.05, 0.1, 0.3):
        capped_thr = union_cap_thresholds(logits, thr, cap)
        kept = int((logits.double() >= capped_thr[:, None]).any(0).sum())
        assert abs(kept - math.ceil(cap * 8000)) <= 2, (cap, kept)


def test_max_budget_outside_its_range_is_refused():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_budget"):
            union_cap_mask(torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), bad)
        with pytest.raises(ValueError, match="max_budget"):
            union_cap_thresholds(torch.zeros(1, 4), torch.zeros(1), bad)


def test_hist_selection_keeps_argmax_and_mass_on_far_tail():
    # a big flat tail far below the max: the bins must still reach p (or keep everything)
    logits = torch.cat([torch.tensor([30.0]), torch.zeros(5000)]).view(1, -1)
    for p in (0.5, 0.99):
        mask = top_p_mask_hist(logits, p)
        probs = torch.softmax(logits.double(), -1)
        assert mask[0, 0] and probs[mask].sum() >= p - 1e-12


@pytest.mark.parametrize(
    "length,encoded,sink,window,expect",
    [
        (1000, 1000, 64, 64, (64, 936)),
        (1000, 900, 64, 64, (64, 900)),  # unencoded tail stays in the window
        (100, 100, 64, 64, (64, 64)),  # shorter than sink + window: all dense
        (30, 30, 64, 64, (30, 30)),  # shorter than the sink
        (1000, 1000, 0, 0, (0, 1000)),
    ],
)
def test_decode_regions(length, encoded, sink, window, expect):
    reg = decode_regions(length, encoded, sink, window)
    assert (reg.sink_end, reg.score_end) == expect


def test_bad_p_rejected():
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            top_p_mask(torch.zeros(1, 3), p)
