import math

import pytest
import torch

from sglang_rabitq.reference import top_p_mask, top_p_mask_hist
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


@pytest.mark.parametrize("p", [0.9, 1.0])
@pytest.mark.parametrize("cap", [0.03, 0.2])
def test_max_budget_keeps_the_top_of_the_top_p_set(p, cap, fresh_seed):
    logits = torch.randn(6, 500) * 0.5  # flat: top-p alone keeps most tokens
    uncapped, capped = top_p_mask(logits, p), top_p_mask(logits, p, max_budget=cap)
    for r in range(6):
        assert int(capped[r].sum()) == min(int(uncapped[r].sum()), math.ceil(cap * 500))
        assert not (capped[r] & ~uncapped[r]).any()
        assert logits[r][capped[r]].min() >= logits[r][uncapped[r] & ~capped[r]].max()
    assert torch.equal(top_p_mask(logits, p, max_budget=1.0), uncapped)


@pytest.mark.parametrize("p", [0.9, 1.0])
@pytest.mark.parametrize("cap", [0.03, 0.2])
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_hist_max_budget_cuts_inside_the_bin_of_the_capth_token(p, cap, scale, fresh_seed):
    logits = torch.randn(8, 4000) * scale
    hist, capped = top_p_mask_hist(logits, p), top_p_mask_hist(logits, p, max_budget=cap)
    want = math.ceil(cap * 4000)
    for r in range(8):
        assert capped[r][logits[r].argmax()]
        assert not (capped[r] & ~hist[r]).any()  # a higher threshold: a subset
        if int(hist[r].sum()) <= want:
            assert torch.equal(capped[r], hist[r])
            continue
        # every token of a bin above the want-th largest token's is kept, none of a bin below
        bins = torch.floor(logits[r].double() / BIN_WIDTH)
        edge = bins.sort(descending=True).values[want - 1]
        assert capped[r][bins > edge].all() and not capped[r][bins < edge].any()


def test_hist_max_budget_keeps_the_cap_where_logits_spread_evenly():
    logits = torch.linspace(0.0, 4.0, 8000).view(1, -1)  # 500 tokens per bin, spread evenly
    for cap in (0.05, 0.1, 0.3):
        kept = int(top_p_mask_hist(logits, 1.0, max_budget=cap).sum())
        assert abs(kept - math.ceil(cap * 8000)) <= 2, (cap, kept)


def test_max_budget_outside_its_range_is_refused():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_budget"):
            top_p_mask(torch.zeros(1, 4), 0.9, max_budget=bad)


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
