"""Fidelity study: RaBitQ selection on REAL attention, to pick the backend's defaults from measurements.

    PYTHONPATH=. python eval/fidelity.py --model smollm2 --out eval/results

1. Runs a real model (HF folder, or a name that ``eval/fetch_model.py`` can fetch) on one long, deterministic,
   generated text and captures post-RoPE q, k and v of every layer through a custom attention function.
2. At sampled decode positions ``t`` (cache = keys 0..t, the current token's included, as in SGLang's decode)
   it runs the reference math (rotation, codes, INT4 query, histogram top-p) for a grid of variants and
   measures against exact attention: estimator error, true mass retained, recall of the oracle top-p set,
   budget, and the relative L2 error of the attention output.
3. Picks centring, rounding, selection and sink/window (most true mass at equal K/V budget), then top_p and a
   score temperature on that combination (the issue's goal: true mass >= p), measures the budget at several
   context lengths and writes fidelity.json, fidelity.md and plots (``--render`` redraws them from the JSON).

Everything per (position, head) is batched into [P, Hq, T] tensors: one layer of the full grid is a few
seconds on two CPU cores. The kernels' histogram selector is re-implemented batched here (``hist_keep``) and
checked to equal ``reference.select.top_p_mask_hist`` before use.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sglang_rabitq.reference.codes import encode_keys, quantize_query, random_rotation, unpack_bits
from sglang_rabitq.reference.decode import decode_regions
from sglang_rabitq.reference.estimator_stats import rabitq_error_bound
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS, SMALL_BIN, top_p_mask_hist


@dataclass
class StudyConfig:
    tokens: int = 8192  # length of the input (SmolLM2 is an 8K model)
    positions: int = 64  # decode positions of the main grid, sampled in the last half of the input
    calib: int = 512  # keys of the first `calib` tokens give the fixed centre per (layer, kv-head)
    dense_layers: int = 2  # layers attended densely by the backend: reported apart, not in "overall"
    seed: int = 0
    centring: tuple = ("none", "calibrate")
    rounding: tuple = ("nearest", "random")
    selection: tuple = ("head", "union")  # per query head top-p / union of a kv-head's query heads
    top_p: tuple = (0.8, 0.9, 0.95, 0.98)
    sink_window: tuple = (64, 128)  # sink = window = this many tokens
    contexts: tuple = (1024, 2048, 4096, 8192)  # budget vs context length
    context_positions: int = 32  # per context, sampled in [7/8 C, C)
    goal_slack: float = 0.05  # goal: retained mass mean >= p and 5th percentile >= p - slack
    # on the best combination: p and the temperature of the estimated logits (< 1 widens the selected set)
    calib_top_p: tuple = (0.8, 0.9, 0.95, 0.98, 0.99)
    temperatures: tuple = (1.0, 0.85, 0.7, 0.6, 0.5)
    max_out_err_p95: float = 0.10  # the default p keeps the attention output this close to dense (95th pct)
    top_p_scope: str = "scored"  # as --rabitq-top-p-scope (context: the sink and window's mass counts towards p)
    prior_tempered: bool = True  # context scope: the sink/window logits get the score temperature too (as served)


# ----------------------------------------------------------------------------------------------------------
# 1. A long, natural-ish, deterministic text (no downloads): documents, code, tables, dialogue, and facts
#    stated early and asked about / restated later, so retrieval-like attention patterns occur.

_FIRST = "Ada Bruno Chiara Dmitri Elena Farid Greta Hiro Ines Jonas Kamala Luca Mira Nadia Omar Priya Quentin Rosa Sven Tariq Uma Viktor Wen Xenia Yusuf Zofia".split()
_LAST = "Alvarez Becker Castillo Dubois Eriksen Fischer Gallo Haddad Ivanova Jensen Kowalski Lindqvist Moreau Nakamura Okafor Petrov Quinn Rossi Sato Tanaka Ueda Varga Weber Yilmaz Zhang".split()
_SYL = "ar bel cor dun el fen gar hal ist jor kel lun mar nor or pel quin ros sal tor ul ven wyn yar zel".split()
_JOBS = "engineer librarian botanist pilot chemist carpenter economist nurse cartographer baker archivist teacher geologist composer".split()
_ORGS = "observatory,museum,shipyard,hospital,university,railway company,water board,seed bank,printing house,weather station".split(",")
_ADJ = "quiet busy ancient modern narrow coastal northern southern crowded remote rainy dusty green industrial".split()
_NOUNS = "bridge harbour market tower library canal orchard factory station garden archive theatre mill lighthouse".split()
_VERBS = "repaired designed catalogued measured rebuilt studied mapped restored inspected documented painted expanded".split()
_ITEMS = "bolts lanterns notebooks cables valves batteries ropes lenses filters gears pumps sensors tiles hinges".split()
_COLORS = "red blue green amber violet grey white black orange silver".split()


def _place(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _document(rng: random.Random) -> str:
    town, who = _place(rng), _person(rng)
    s = [
        f"## Notes on {town}\n",
        f"{town} is a {rng.choice(_ADJ)} town of about {rng.randint(2, 90) * 1000} people on the {rng.choice(['river', 'coast', 'plateau', 'border'])}.",
        f"In {rng.randint(1800, 2020)}, {who}, a {rng.choice(_JOBS)} at the local {rng.choice(_ORGS)}, {rng.choice(_VERBS)} the old {rng.choice(_NOUNS)}.",
        f"Visitors usually remember the {rng.choice(_ADJ)} {rng.choice(_NOUNS)} and the {rng.choice(_NOUNS)} next to it.",
        f"The {rng.choice(_NOUNS)} was {rng.choice(_VERBS)} again in {rng.randint(1900, 2023)} after a {rng.choice(['flood', 'fire', 'storm', 'long dispute'])}.",
        f"According to {_person(rng)}, \"nobody expected the {rng.choice(_NOUNS)} to last {rng.randint(3, 200)} years\".",
    ]
    rng.shuffle(s[2:])
    return " ".join(s) + "\n"


def _code(rng: random.Random) -> str:
    fn = f"{rng.choice(['load', 'count', 'merge', 'filter', 'group'])}_{rng.choice(_NOUNS)}_{rng.choice(_ITEMS)}"
    arg, item = rng.choice(["items", "rows", "values"]), rng.choice(_ITEMS)
    k = rng.randint(2, 9)
    return (
        f"```python\ndef {fn}({arg}, limit={rng.randint(10, 500)}):\n"
        f'    """Return the {item} of {arg} above the limit, at most {k} per group."""\n'
        f"    out = {{}}\n    for key, value in {arg}:\n"
        f"        if value > limit and len(out.setdefault(key, [])) < {k}:\n"
        f"            out[key].append(value * {rng.randint(2, 12)})\n"
        f"    return out\n```\n"
    )


def _table(rng: random.Random) -> str:
    rows = [f"| {_place(rng)} | {rng.choice(_ITEMS)} | {rng.randint(1, 999)} | {rng.choice(_COLORS)} |" for _ in range(rng.randint(4, 9))]
    return "| depot | item | count | colour |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _dialogue(rng: random.Random) -> str:
    a, b = _person(rng), _person(rng)
    return (
        f"{a}: Did you finish the report on the {rng.choice(_NOUNS)} in {_place(rng)}?\n"
        f"{b}: Almost. The {rng.choice(_ITEMS)} arrived {rng.randint(2, 30)} days late, so I {rng.choice(_VERBS)} the plan.\n"
        f"{a}: Send it before {rng.choice(['Monday', 'Friday', 'noon', 'the meeting'])}, please.\n"
    )


def build_text(seed: int, min_chars: int) -> tuple[str, str]:
    """Deterministic ``(body, question)``; the body has at least ``min_chars`` characters (same seed, same text)."""
    rng = random.Random(seed)
    facts = [f"The {c} locker of the {_place(rng)} depot opens with code {rng.randint(1000, 9999)}." for c in _COLORS]
    parts = ["# Field notebook\n", "Important facts:\n" + "\n".join(facts[:5]) + "\n"]
    gens = [_document, _document, _code, _table, _dialogue]
    n = 0
    while sum(map(len, parts)) < min_chars:
        n += 1
        parts.append(rng.choice(gens)(rng))
        if n % 12 == 0:  # restate an earlier fact, or state a new one
            parts.append("Reminder: " + facts[rng.randrange(len(facts))] + "\n")
    return "\n".join(parts), "\nQuestion: which code opens the " + _COLORS[1] + " locker? Answer:"


def encode_text(tokenizer, cfg: StudyConfig) -> torch.Tensor:
    """``[1, cfg.tokens]`` token ids: the start of the body, cut to fit, then the closing question."""
    chars = cfg.tokens * 4
    while True:
        body, question = build_text(cfg.seed, chars)
        b = tokenizer(body, return_tensors="pt").input_ids
        q = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids
        need = cfg.tokens - q.shape[1]
        if b.shape[1] >= need:
            return torch.cat([b[:, :need], q], 1)
        chars *= 2


# ----------------------------------------------------------------------------------------------------------
# 2. Capture post-RoPE q, k, v per layer through transformers' attention-function registry.

CAPTURE = "rabitq_capture"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query [1, Hq, T, D], key/value [1, Hkv, T, D]: post-RoPE, before GQA expansion
    _captured[module.layer_idx] = tuple(x[0].transpose(0, 1).float().clone() for x in (query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def dump_qkv(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` once on ``input_ids [1, T]``; returns q [L, T, Hq, D], k and v [L, T, Hkv, D] (float32).

    No attention mask is registered for the capture function, so SDPA runs plain causal attention: right
    for one unpadded sequence. The LM head is skipped (``model.model``): its [T, vocab] logits are not needed.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE, _capture_attention)
    old = model.config._attn_implementation
    model.config._attn_implementation = CAPTURE
    _captured.clear()
    try:
        base = getattr(model, "model", model)
        base(input_ids=input_ids, use_cache=False)
        layers = sorted(_captured)
        return {name: torch.stack([_captured[i][j] for i in layers]) for j, name in enumerate("qkv")}
    finally:
        model.config._attn_implementation = old
        _captured.clear()


# ----------------------------------------------------------------------------------------------------------
# 3. The kernels' histogram top-p, batched. reference.select.top_p_mask_hist loops over rows in Python
#    (~0.4 s per layer-variant here, minutes over the grid); hist_keep does the same arithmetic on all rows
#    at once. The selector is still being tuned by others, so run_study checks hist_keep against the
#    reference on sample rows first and falls back to the reference if they differ (recorded in the JSON).


NO_LIMIT = -1e300  # threshold that keeps every scored token (and no -inf one)


def hist_prepare(x: torch.Tensor) -> dict:
    """The p-independent part of the histogram for every row of ``x [R, N]`` (float64, ``-inf`` = not scored)."""
    finite = torch.isfinite(x)
    m = torch.where(finite.any(-1), x.amax(-1), 0.0)
    top = torch.floor(m / BIN_WIDTH).to(torch.int64)
    k = top[:, None] - torch.floor(torch.where(finite, x, m[:, None]) / BIN_WIDTH).to(torch.int64)
    inside = finite & (k < HIST_BINS)
    kk = torch.where(inside, k, 0)
    count = torch.zeros(x.shape[0], HIST_BINS, dtype=torch.int64).scatter_add_(1, kk, inside.to(torch.int64))
    # a bin's mass: its count at the bin's middle logit, as the kernels weigh it
    mids = (top[:, None] - torch.arange(HIST_BINS) + 0.5).to(torch.float64) * BIN_WIDTH
    mass = count.to(torch.float64) * torch.exp(mids - m[:, None])
    return {"m": m, "z": mass.sum(-1), "top": top, "mass": mass, "count": count, "cum": torch.cumsum(mass, 1)}


def hist_threshold_batched(h: dict, p: float, prior_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the logit threshold of ``reference.select.hist_threshold`` (``NO_LIMIT`` for keep-all)."""
    if p >= 1.0:
        return torch.full_like(h["m"], NO_LIMIT)
    m, z = h["m"], h["z"]
    prior = 0.0 if prior_lse is None else torch.exp((prior_lse.to(torch.float64) - m).clamp_max(700.0))
    target = p * z - (1.0 - p) * prior  # what the bins must bring (the prior counts towards p)
    hit = h["cum"] >= target[:, None]
    b = hit.to(torch.int8).argmax(-1, keepdim=True)  # first bin reaching p: the crossing bin
    bin_mass, bin_count = h["mass"].gather(1, b)[:, 0], h["count"].gather(1, b)[:, 0]
    mass_above = h["cum"].gather(1, b)[:, 0] - bin_mass
    # crossing_threshold(), vectorized: interpolate inside the bin, or keep a small bin whole
    lo = (h["top"] - b[:, 0]).to(torch.float64) * BIN_WIDTH
    frac = ((target - mass_above) / torch.where(bin_mass > 0, bin_mass, 1.0)).clamp(0.0, 1.0)
    e_hi, e_lo = torch.exp(lo + BIN_WIDTH - m), torch.exp(lo - m)
    interp = m + torch.log(e_hi - frac * (e_hi - e_lo))
    thr = torch.minimum(torch.where(bin_count <= SMALL_BIN, lo, interp), m)
    return torch.where(hit.any(-1), thr, NO_LIMIT)


def hist_keep(logits: torch.Tensor, p: float, prior_lse: torch.Tensor | None = None) -> torch.Tensor:
    """``top_p_mask_hist`` for all rows of ``logits [R, N]`` at once; ``-inf`` marks tokens not scored."""
    x = logits.to(torch.float64)
    return x >= hist_threshold_batched(hist_prepare(x), p, prior_lse)[:, None]


def reference_keep(logits: torch.Tensor, p: float, prior_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The reference selector itself (slow): the fallback."""
    finite = torch.isfinite(logits)
    return top_p_mask_hist(torch.where(finite, logits, 0.0), p, finite, prior_lse)


@dataclass
class Selector:
    """Histogram top-p as the study runs it: batched (prepare once, threshold per p) or the reference."""

    batched: bool = True

    @property
    def name(self) -> str:
        return "batched (checked equal to reference)" if self.batched else "reference (batched differed)"

    def prepare(self, x: torch.Tensor):
        return hist_prepare(x) if self.batched else None

    def keep(self, x: torch.Tensor, prep, p: float, prior_lse: torch.Tensor | None = None) -> torch.Tensor:
        if self.batched:
            return x >= hist_threshold_batched(prep, p, prior_lse)[:, None]
        return reference_keep(x, p, prior_lse)


def pick_selector(seed: int = 0, rows: int = 64, n: int = 3000) -> Selector:
    """Batched when it equals the reference on test rows (peaked, flat, partly empty ones), else the reference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 6, rows, dtype=torch.float64)[:, None]
    x[::7, : n // 2] = float("-inf")
    x[5] = float("-inf")
    x[9, 10:] = float("-inf")
    prior = torch.logsumexp(x, -1) + torch.linspace(-5, 3, rows, dtype=torch.float64)  # sink/window mass
    same = all(bool((hist_keep(x, p, pr) == reference_keep(x, p, pr)).all())
               for p in (0.5, 0.8, 0.9, 0.95, 0.98, 0.995, 1.0) for pr in (None, prior))
    return Selector(batched=same)


def oracle_masks(logits: torch.Tensor, ps) -> dict:
    """``reference.select.top_p_mask(logits, p)`` for several ``p`` from one sort (``-inf`` = not scored)."""
    x = logits.to(torch.float64)
    has_any = torch.isfinite(x).any(-1, keepdim=True)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    xs = torch.gather(x, -1, order)
    probs = torch.softmax(xs, dim=-1)
    before = torch.cumsum(probs, -1) - probs  # mass strictly before each sorted entry
    out = {}
    for p in ps:
        if p >= 1.0:
            out[p] = torch.isfinite(x) & has_any
            continue
        keep_sorted = (before < p) & torch.isfinite(xs)
        out[p] = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & has_any
    return out


def estimate_logits(q_bar: torch.Tensor, signs: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Float form of the integer estimate, batched: ``g * <2b-1, q_bar>`` -> ``[P, Hq, N]`` float64.

    ``q_bar [P, Hq, D]`` rotated dequantized queries, ``signs [N, Hkv, D]`` (+-1), ``factor [N, Hkv]``.
    Equal to ``estimate_int`` (the same sum regrouped; tested).
    """
    p, hq, d = q_bar.shape
    hkv = signs.shape[1]
    qb = q_bar.view(p, hkv, hq // hkv, d)
    ip = torch.einsum("pkgd,nkd->pkgn", qb, signs)
    return (ip * factor.T[None, :, None, :]).reshape(p, hq, -1)


# ----------------------------------------------------------------------------------------------------------
# 4. One layer: every variant of the grid, as per-(position, query head) samples.


@dataclass
class LayerSamples:
    """Per-variant samples for one layer; keys are (centring, rounding, selection, top_p, sink_window, temperature)."""

    metrics: dict = field(default_factory=dict)  # key -> {metric: tensor [P*Hq]}
    estimator: dict = field(default_factory=dict)  # (centring, rounding) -> {stat: float}


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


@torch.no_grad()
def eval_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: list[int],
    rot: torch.Tensor,
    center: torch.Tensor,
    grid: dict,
    gen: torch.Generator,
    selector: Selector | None = None,
    scope: str = "scored",
    prior_tempered: bool = True,
) -> LayerSamples:
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]``; decode at each ``t`` in ``positions`` over keys ``0..t``.

    ``scope`` as the backend's ``--rabitq-top-p-scope``: ``context`` counts the always-attended tokens'
    exact mass (logits of ``<q, k - c>`` at the same scale and temperature as the estimates, or at the
    plain scale with ``prior_tempered=False``) towards p.

    ``grid`` holds the tuples to sweep: centring, rounding, selection, top_p, sink_window, temperature (the
    estimated logits are multiplied by it before selection: < 1 widens the set against estimator noise).
    ``center [Hkv, D]`` is the calibrated centre.
    """
    selector = selector or Selector()
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5
    pos = torch.tensor(positions)
    n = int(pos.max()) + 1
    k, v = k[:n].double(), v[:n]
    qs = q[pos].double()  # [P, Hq, D]
    idx = torch.arange(n)
    length = pos + 1  # cache length at each decode step
    valid = idx[None, :] < length[:, None]  # [P, N]
    valid_h = valid[:, None, :].expand(-1, hq, -1)

    logits = torch.einsum("phd,nhd->phn", qs, k.repeat_interleave(g, dim=1)) * scale
    logits = logits.masked_fill(~valid_h, float("-inf"))
    w = torch.softmax(logits, -1).float()  # true attention weights [P, Hq, N]; float32 is plenty for masses
    vv = v.repeat_interleave(g, dim=1)  # [N, Hq, D]
    out_dense = torch.einsum("phn,nhd->phd", w, vv)

    regions = {}  # per sink/window, following decode_regions(): always-attended and scored tokens
    for sw in grid["sink_window"]:
        ends = [decode_regions(int(L), int(L), sw, sw) for L in length]
        sink_end = torch.tensor([r.sink_end for r in ends])
        score_end = torch.tensor([r.score_end for r in ends])
        scored = (idx[None] >= sink_end[:, None]) & (idx[None] < score_end[:, None])
        always = valid & ~scored
        always_w = w * always[:, None, :]
        # oracle: exact minimal top-p sets on the TRUE logits of the scored region
        ora = oracle_masks(logits.masked_fill(~scored[:, None, :], float("-inf")).reshape(-1, n), grid["top_p"])
        ora = {p: m.view(-1, hq, n) for p, m in ora.items()}
        always_count = always.sum(-1)[:, None]  # [P, 1]
        # each scored token's rank by true weight, and the cumulated true mass in that order: the smallest set
        # holding a given mass is the top `need` ranks ("ideal" budget at equal mass)
        order = torch.sort(logits.masked_fill(~scored[:, None, :], float("-inf")), dim=-1, descending=True, stable=True).indices
        regions[sw] = {
            "rank": torch.empty_like(order).scatter_(-1, order, idx.expand_as(order)),
            "cum_w": torch.cumsum(torch.gather(w, -1, order), -1),
            "scored_count": scored.sum(-1)[:, None],
            "scored": scored,
            "always_mass": always_w.sum(-1),
            "always_out": torch.einsum("phn,nhd->phd", always_w, vv),
            "always_count": always_count,
            "always": always,
            "scored_mass": (w * scored[:, None, :]).sum(-1),
            "oracle": ora,
            "oracle_count": {p: m.sum(-1) for p, m in ora.items()},
            "oracle_kv_budget": {
                p: ((m.view(-1, hkv, g, n).any(2).sum(-1) + always_count) / length[:, None]).repeat_interleave(g, 1)
                for p, m in ora.items()
            },
        }

    out = LayerSamples()
    qnorm = qs.norm(dim=-1)  # [P, Hq]
    for centring in grid["centring"]:
        c = center if centring == "calibrate" else None
        codes, factor = encode_keys(k.float(), rot, c)
        signs = unpack_bits(codes).double() * 2 - 1  # [N, Hkv, D]
        kc = k - (c.double() if c is not None else 0.0)
        ip_true = torch.einsum("phd,nhd->phn", qs, kc.repeat_interleave(g, dim=1))  # <q, k - c>
        denom = qnorm[:, :, None] * kc.norm(dim=-1).repeat_interleave(g, dim=1).T[None]  # |q| |k - c|
        cos_sq = ((ip_true / denom) ** 2)[valid_h]
        for rounding in grid["rounding"]:
            noise = torch.rand(qs.shape, generator=gen) if rounding == "random" else None
            q_u, delta, qmin = quantize_query(qs.float(), rot, rounding=rounding, noise=noise)
            q_bar = delta.double()[..., None] * q_u + qmin.double()[..., None]  # float64 like estimate_int
            est = estimate_logits(q_bar, signs, factor.double())  # estimate of <q, k - c>
            diff = (est - ip_true)[valid_h]
            err = diff / denom[valid_h]
            out.estimator[centring, rounding] = {
                "err_mean": float(err.mean()),
                "err_std": float(err.std()),
                # bound(D, cos) = bound(D, 0) * sqrt(1 - cos^2); rms over the measured pairs
                "bound": rabitq_error_bound(d, 0.0) * math.sqrt(float((1 - cos_sq).mean())),
                "logit_err_std": float(diff.std()) * scale,
                "key_norm_ratio": float((kc.norm(dim=-1) / k.norm(dim=-1)).mean()),  # what centring shrinks
            }
            for tau, (sw, r) in itertools.product(grid["temperature"], regions.items()):
                x = (est * (scale * tau)).masked_fill(~r["scored"][:, None, :], float("-inf")).reshape(-1, n)
                prep = selector.prepare(x)
                prior = None
                if scope == "context":  # the sink and window's exact mass on the estimates' scale
                    prior_scale = scale * tau if prior_tempered else scale
                    prior = torch.logsumexp((ip_true * prior_scale).masked_fill(~r["always"][:, None, :], float("-inf")), -1)
                    prior = prior.reshape(-1)
                for p in grid["top_p"]:
                    sel_head = selector.keep(x, prep, p, prior).view(-1, hq, n)  # inside the scored region
                    kv_sel = sel_head.view(-1, hkv, g, n).any(2)  # tokens whose K/V a kv-head reads
                    kv_budget = ((kv_sel.sum(-1) + r["always_count"]) / length[:, None]).repeat_interleave(g, 1)
                    for selection in grid["selection"]:
                        if selection == "head":
                            sel = sel_head
                            budget = (sel.sum(-1) + r["always_count"]) / length[:, None]
                        else:  # a kv-head's query heads all attend the union of their sets
                            sel = kv_sel[:, :, None, :].expand(-1, hkv, g, n).reshape(-1, hq, n)
                            budget = kv_budget
                        kept = torch.where(sel, w, 0.0)
                        sel_mass = kept.sum(-1)
                        retained = r["always_mass"] + sel_mass
                        out_sparse = (r["always_out"] + torch.einsum("phn,nhd->phd", kept, vv)) / retained[..., None]
                        ora, ora_n = r["oracle"][p], r["oracle_count"][p]
                        need = torch.searchsorted(r["cum_w"], (sel_mass * (1 - 1e-5))[..., None]) + 1
                        need = torch.where(sel_mass[..., None] > 0, need.clamp_max(r["scored_count"][..., None]), 0)
                        ideal = (r["rank"] < need).view(-1, hkv, g, n).any(2).sum(-1) + r["always_count"]
                        out.metrics[centring, rounding, selection, p, sw, tau] = {
                            k_: t.flatten().double()
                            for k_, t in {
                                "retained": retained,
                                "retained_scored": torch.where(
                                    r["scored_mass"] > 0, sel_mass / r["scored_mass"].clamp_min(1e-30), 1.0
                                ),
                                "recall": torch.where(ora_n > 0, (ora & sel).sum(-1) / ora_n.clamp_min(1), 1.0),
                                "budget": budget,
                                "kv_budget": kv_budget,
                                "oracle_kv_budget": r["oracle_kv_budget"][p],
                                "ideal_kv_budget": (ideal / length[:, None]).repeat_interleave(g, 1),
                                "out_err": (out_sparse - out_dense).norm(dim=-1) / out_dense.norm(dim=-1),
                            }.items()
                        }
    return out


def summarize(samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means and tails of one variant's pooled (position, head) samples."""
    r = samples
    return {
        "retained_mean": float(r["retained"].mean()),
        "retained_p5": _quantile(r["retained"], 0.05),
        "retained_scored_mean": float(r["retained_scored"].mean()),
        "retained_scored_p5": _quantile(r["retained_scored"], 0.05),
        "recall_mean": float(r["recall"].mean()),
        "recall_p5": _quantile(r["recall"], 0.05),
        "budget_mean": float(r["budget"].mean()),
        "kv_budget_mean": float(r["kv_budget"].mean()),
        "kv_budget_p95": _quantile(r["kv_budget"], 0.95),
        "oracle_kv_budget_mean": float(r["oracle_kv_budget"].mean()),
        "ideal_kv_budget_mean": float(r["ideal_kv_budget"].mean()),
        "out_err_mean": float(r["out_err"].mean()),
        "out_err_p95": _quantile(r["out_err"], 0.95),
    }


def meets_goal(overall: dict, p: float, slack: float) -> bool:
    """The issue's goal: true mass retained >= p on average and >= p - slack at the 5th percentile."""
    return overall["retained_mean"] >= p and overall["retained_p5"] >= p - slack


def _pool(per_layer: list[dict], layers: list[int]) -> dict[str, torch.Tensor]:
    return {m: torch.cat([per_layer[i][m] for i in layers]) for m in per_layer[layers[0]]}


# ----------------------------------------------------------------------------------------------------------
# 5. The study: the grid; the best combination; p and temperature on it; budget vs context.

GRID_AXES = ("centring", "rounding", "selection", "top_p", "sink_window", "temperature")


def _log(*args) -> None:
    print(*args, flush=True)


def _positions(lo: int, hi: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(lo, hi), min(count, hi - lo)))


def run_grid(qkv: dict, positions: list[int], cfg: StudyConfig, grid: dict, selector: Selector, log=_log) -> tuple[dict, dict]:
    """All layers: ({variant key: [per-layer samples]}, {(centring, rounding): [per-layer estimator stats]})."""
    nl, _, _, d = qkv["q"].shape
    hkv = qkv["k"].shape[2]
    gen = torch.Generator().manual_seed(cfg.seed)
    variants: dict = {}
    estimator: dict = {}
    for layer in range(nl):
        t0 = time.time()
        rot = random_rotation(d, seed=cfg.seed * 1000 + layer, num_heads=hkv)  # one per (layer, kv-head)
        center = qkv["k"][layer, : cfg.calib].mean(0)  # [Hkv, D], fixed for the server's lifetime
        res = eval_layer(qkv["q"][layer], qkv["k"][layer], qkv["v"][layer], positions, rot, center, grid, gen, selector,
                         cfg.top_p_scope, cfg.prior_tempered)
        for key, smp in res.metrics.items():
            variants.setdefault(key, []).append(smp)
        for key, st in res.estimator.items():
            estimator.setdefault(key, []).append(st)
        log(f"  layer {layer}: {time.time() - t0:.1f}s")
    return variants, estimator


def _report(raw: dict, sparse: list[int], dense: list[int], slack: float, per_layer: bool = True) -> list[dict]:
    out = []
    for key, layers in raw.items():
        v = dict(zip(GRID_AXES, key))
        v["overall"] = summarize(_pool(layers, sparse))
        v["overall"]["meets_goal"] = meets_goal(v["overall"], v["top_p"], slack)
        if per_layer:
            v["dense_layers"] = summarize(_pool(layers, dense)) if dense else None
            v["per_layer"] = [summarize(smp) for smp in layers]
        out.append(v)
    return out


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) over sorted points, clamped at the ends."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return ys[-1]


def best_combination(variants: list[dict]) -> tuple[tuple, dict]:
    """Centring, rounding, selection and sink/window: the combination that keeps the most true mass at equal
    K/V budget. Each combination's (kv budget, retained mean + 5th percentile) curve over p is interpolated at
    8 budgets spanning the range all curves share, and the scores averaged. Equal p is not equal cost: the
    union spends more budget than per-head sets at the same p, so p-wise comparisons would mislead."""
    curves: dict = {}
    for v in variants:
        combo = (v["centring"], v["rounding"], v["selection"], v["sink_window"])
        o = v["overall"]
        curves.setdefault(combo, []).append((o["kv_budget_mean"], o["retained_mean"] + o["retained_p5"]))
    curves = {c: sorted(pts) for c, pts in curves.items()}
    lo = max(pts[0][0] for pts in curves.values())
    hi = min(pts[-1][0] for pts in curves.values())
    if hi <= lo:  # no shared range: compare over the union of ranges (clamped)
        lo, hi = min(pts[0][0] for pts in curves.values()), max(pts[-1][0] for pts in curves.values())
    budgets = [lo * (hi / lo) ** (i / 7) for i in range(8)]  # log-spaced
    scores = {
        c: sum(_interp([b for b, _ in pts], [y for _, y in pts], b) for b in budgets) / (2 * len(budgets))
        for c, pts in curves.items()
    }
    best = max(scores, key=scores.get)
    return best, {"/".join(map(str, c)): round(sc, 4) for c, sc in sorted(scores.items(), key=lambda kv: -kv[1])}


def pick_operating_point(calib: list[dict], cfg: StudyConfig) -> tuple[dict | None, list[dict]]:
    """(top_p, temperature) on the chosen combination. For each p, the temperature with the smallest K/V budget
    among those meeting the goal; the default is the lowest such p whose attention output is within
    ``cfg.max_out_err_p95`` at the 95th percentile (else the most accurate p that meets the goal)."""
    per_p = []
    for p in sorted({c["top_p"] for c in calib}):
        ok = [c for c in calib if c["top_p"] == p and c["overall"]["meets_goal"]]
        if ok:
            per_p.append(min(ok, key=lambda c: c["overall"]["kv_budget_mean"]))
    if not per_p:
        return None, per_p
    good = [c for c in per_p if c["overall"]["out_err_p95"] <= cfg.max_out_err_p95]
    return (good[0] if good else min(per_p, key=lambda c: c["overall"]["out_err_p95"])), per_p


def run_study(model, input_ids: torch.Tensor, cfg: StudyConfig, model_info: dict | None = None, log=_log) -> dict:
    """The whole study on one model and one input; returns the JSON-able results."""
    t_start = time.time()
    qkv = dump_qkv(model, input_ids)
    nl, t, hq, d = qkv["q"].shape
    hkv = qkv["k"].shape[2]
    log(f"dumped q/k/v: {nl} layers, {t} tokens, {hq}/{hkv} heads, head_dim {d} ({time.time() - t_start:.1f}s)")
    selector = pick_selector(cfg.seed)
    log(f"selector: {selector.name}")
    positions = _positions(t // 2, t, cfg.positions, cfg.seed)
    sparse = [i for i in range(nl) if i >= cfg.dense_layers] or list(range(nl))
    dense = [i for i in range(nl) if i < cfg.dense_layers]

    # 1. the grid, at temperature 1 (plain top-p on the estimated weights)
    grid = {a: getattr(cfg, a) for a in GRID_AXES[:-1]} | {"temperature": (1.0,)}
    raw, est = run_grid(qkv, positions, cfg, grid, selector, log)
    variants = _report(raw, sparse, dense, cfg.goal_slack)
    estimator = []
    for (centring, rounding), per_layer in est.items():
        mean = lambda name: sum(per_layer[i][name] for i in sparse) / len(sparse)  # noqa: E731
        overall = {name: mean(name) for name in per_layer[0]}
        estimator.append({"centring": centring, "rounding": rounding, "overall": overall, "per_layer": per_layer})

    # 2. the combination, then p and temperature on it
    combo, scores = best_combination(variants)
    log(f"best combination (centring, rounding, selection, sink/window): {combo}")
    one = {"centring": (combo[0],), "rounding": (combo[1],), "selection": (combo[2],), "sink_window": (combo[3],)}
    cal_grid = one | {"top_p": cfg.calib_top_p, "temperature": cfg.temperatures}
    raw_cal, _ = run_grid(qkv, positions, cfg, cal_grid, selector, log=lambda *_: None)
    calibration = _report(raw_cal, sparse, dense, cfg.goal_slack)
    point, per_p = pick_operating_point(calibration, cfg)
    if point is None:  # nothing meets the goal: report the most accurate point, flagged
        point = max(calibration, key=lambda c: c["overall"]["retained_p5"])
    rec = {
        "centring": combo[0], "rounding": combo[1], "selection": combo[2], "sink_window": combo[3],
        "top_p": point["top_p"], "temperature": point["temperature"], "meets_goal": point["overall"]["meets_goal"],
        "overall": point["overall"], "per_layer": point["per_layer"],
        "combination_scores": scores, "cheapest_meeting_goal_per_p": [
            {"top_p": c["top_p"], "temperature": c["temperature"], **c["overall"]} for c in per_p
        ],
        "rule": " ".join((best_combination.__doc__ + " " + pick_operating_point.__doc__).split()),
    }
    log(f"recommended: {rec['top_p']=} {rec['temperature']=} meets_goal={rec['meets_goal']}")

    # 3. budget vs context length at the recommended combination and temperature, every p
    ctx_grid = one | {"top_p": tuple(sorted(set(cfg.top_p) | {rec["top_p"]})), "temperature": (rec["temperature"],)}
    context = []
    for c in [c for c in cfg.contexts if c <= t]:
        pos = _positions(c - c // 8, c, cfg.context_positions, cfg.seed + c)
        raw_c, _ = run_grid(qkv, pos, cfg, ctx_grid, selector, log=lambda *_: None)
        context += [{"context": c, **v} for v in _report(raw_c, sparse, dense, cfg.goal_slack, per_layer=False)]
        log(f"context {c}: done")

    return {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "model": {**(model_info or {}), "layers": nl, "q_heads": hq, "kv_heads": hkv, "head_dim": d},
        "config": {**asdict(cfg), "main_positions": positions, "tokens_used": t, "selector": selector.name},
        "estimator": estimator,
        "variants": variants,
        "calibration": calibration,
        "recommended": rec,
        "context": context,
        "budget_extrapolation": extrapolate_budget(context, ctx_grid["top_p"], (16384, 32768)),
        "wall_s": round(time.time() - t_start, 1),
    }


def extrapolate_budget(context: list[dict], top_ps, targets) -> list[dict]:
    """Fit kv_budget = a * C^b (least squares in log-log) per p over the measured contexts. An extrapolation."""
    out = []
    for p in top_ps:
        pts = sorted((c["context"], c["overall"]["kv_budget_mean"]) for c in context if c["top_p"] == p)
        if len(pts) < 2:
            continue
        xs = torch.tensor([math.log(c) for c, _ in pts], dtype=torch.float64)
        ys = torch.tensor([math.log(b) for _, b in pts], dtype=torch.float64)
        b = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        a = float(ys.mean()) - b * float(xs.mean())
        out.append({"top_p": p, "exponent": b, **{str(tc): min(1.0, math.exp(a + b * math.log(tc))) for tc in targets}})
    return out


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import subprocess

        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        out["git"] = rev.stdout.strip() or None
    except OSError:
        out["git"] = None
    return out


# ----------------------------------------------------------------------------------------------------------
# 6. Outputs: JSON, Markdown summary, plots.


def write_outputs(res: dict, out_dir: Path, command: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {**res, "command": command}
    files = [out_dir / "fidelity.json", out_dir / "fidelity.md"]
    files[0].write_text(json.dumps(_rounded(_columnar(res)), indent=1))
    files[1].write_text(render_markdown(res))
    try:
        files += plot(res, out_dir)
    except ImportError:  # matplotlib is the optional `eval` extra
        pass
    return files


def _columnar(res: dict) -> dict:
    """Per-layer lists of dicts -> {metric: [value per layer]} for the JSON (a third of the size)."""
    def cols(rows):
        return {k: [r[k] for r in rows] for k in rows[0]} if isinstance(rows, list) and rows else rows

    res = dict(res)
    for part in ("variants", "calibration", "estimator"):
        res[part] = [{**v, "per_layer": cols(v["per_layer"])} if "per_layer" in v else v for v in res[part]]
    res["recommended"] = {**res["recommended"], "per_layer": cols(res["recommended"]["per_layer"])}
    return res


def _rows(per_layer) -> list[dict]:
    """Inverse of the JSON's columnar per-layer form (a list of dicts passes through)."""
    if isinstance(per_layer, list):
        return per_layer
    return [dict(zip(per_layer, vals)) for vals in zip(*per_layer.values())]


def _rounded(obj):
    """Floats to 5 significant digits: the JSON stays diffable and small, far below any measured difference."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _f(x: float, n: int = 3) -> str:
    return f"{x:.{n}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def findings(res: dict) -> list[str]:
    """Plain-language statements read off the results (so a rerun on another model rewrites them)."""
    rec, out = res["recommended"], []
    est = {(e["centring"], e["rounding"]): e["overall"] for e in res["estimator"]}
    e = est.get(("none", "nearest")) or next(iter(est.values()))
    out.append(
        f"Estimator: mean error {e['err_mean']:+.4f} (unbiased), std {e['err_std']:.4f} against RaBitQ's bound "
        f"{e['bound']:.4f} (ratio {e['err_std'] / e['bound']:.2f}) in cosine units. In logit units that is a noise of std "
        f"{e['logit_err_std']:.2f} on every estimated logit: |q| |k| is large, so a small cosine error is a large logit error."
    )
    if ("calibrate", "nearest") in est and ("none", "nearest") in est:
        c, n = est["calibrate", "nearest"], est["none", "nearest"]
        out.append(
            f"Centring on the calibration mean shrinks |k| to {c['key_norm_ratio']:.2f} of itself on average and the logit "
            f"noise from {n['logit_err_std']:.2f} to {c['logit_err_std']:.2f}."
        )
    if ("none", "random") in est and ("none", "nearest") in est:
        r, n = est["none", "random"]["err_std"], est["none", "nearest"]["err_std"]
        out.append(
            f"Random rounding of the INT4 query: error std {r:.4f} vs {n:.4f} for nearest; "
            + ("its unbiasedness buys nothing here (the rounding noise adds variance)." if r >= n else "it lowers the error.")
        )
    t1 = [v for v in res["variants"] if v["temperature"] == 1.0]
    if t1:
        ok = [v for v in t1 if v["overall"]["meets_goal"]]
        under = sum(v["overall"]["kv_budget_mean"] < v["overall"]["oracle_kv_budget_mean"] for v in t1)
        out.append(
            f"Plain top-p on the estimated weights (temperature 1) meets the goal in {len(ok)} of {len(t1)} grid variants. "
            f"In {under} of them it reads fewer tokens than the exact top-p set would: the logit noise sharpens the "
            "estimated softmax (a noisy maximum looks more dominant than it is), so the estimated mass reaches p too early."
        )
    cal = res["calibration"]
    ref = sorted((c["overall"]["kv_budget_mean"], c["overall"]["retained_mean"]) for c in cal if c["temperature"] == 1.0)
    if len(ref) > 1:
        gaps = [c["overall"]["retained_mean"] - _interp([b for b, _ in ref], [y for _, y in ref], c["overall"]["kv_budget_mean"])
                for c in cal if c["temperature"] != 1.0 and ref[0][0] <= c["overall"]["kv_budget_mean"] <= ref[-1][0]]
        if gaps:
            out.append(
                f"At equal kv budget, lower temperatures keep {min(gaps):+.3f} to {max(gaps):+.3f} true mass compared with "
                "temperature 1 (within its budget range): p and temperature move along one accuracy/budget frontier set by "
                "the estimator. The temperature does not buy a better trade-off; it makes the knob honest (true mass >= p)."
            )
    out.append(
        f"A score temperature < 1 (estimated logits x t before top-p) undoes that sharpening; like a shrinkage "
        f"estimator it trades budget for recall. The chosen t = {rec['temperature']} at p = {rec['top_p']} "
        + ("meets the goal" if rec["meets_goal"] else "is the best found but does NOT meet the goal")
        + f" with a kv budget of {rec['overall']['kv_budget_mean']:.3f}; an exact selector keeping the same mass would read "
        f"{rec['overall']['ideal_kv_budget_mean']:.3f}. The temperature is not a RaBitQConfig field yet: the scoring "
        "kernel would multiply sm_scale by it."
    )
    rows = _rows(rec["per_layer"])
    pl = rows[res["config"]["dense_layers"]:]
    if pl:
        worst = min(range(len(pl)), key=lambda i: pl[i]["retained_p5"]) + res["config"]["dense_layers"]
        out.append(
            f"Layers differ: kv budget from {min(x['kv_budget_mean'] for x in pl):.3f} to {max(x['kv_budget_mean'] for x in pl):.3f} "
            f"across sparse layers; the weakest 5th percentile of retained mass is layer {worst} "
            f"({rows[worst]['retained_p5']:.3f})."
        )
    ctx = sorted((c for c in res["context"] if c["top_p"] == rec["top_p"]), key=lambda c: c["context"])
    if ctx:
        ex = next((x for x in res["budget_extrapolation"] if x["top_p"] == rec["top_p"]), None)
        out.append(
            "Budget vs context at the defaults: "
            + ", ".join(f"{c['context']}: {c['overall']['kv_budget_mean']:.3f}" for c in ctx)
            + (f"; a power-law fit (exponent {ex['exponent']:+.2f}) EXTRAPOLATES {ex['16384']:.3f} at 16K and "
               f"{ex['32768']:.3f} at 32K, beyond this model's context." if ex else ".")
        )
    out.append(
        "Caveats: one generated text (templated prose, code, tables, dialogue; no downloads), one model whose weights "
        "went through 4-bit GGUF quantization, decode positions sampled from one sequence, and the budget past the "
        "model's context is extrapolated, not measured."
    )
    return out


def render_markdown(res: dict) -> str:
    m, cfg, rec = res["model"], res["config"], res["recommended"]
    o = rec["overall"]
    plain = [v for v in res["variants"] if v["overall"]["meets_goal"]]
    lines = [
        "# RaBitQ fidelity on real attention",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Model: {m.get('name', '?')} ({m['layers']} layers, {m['q_heads']} q / {m['kv_heads']} kv heads, "
        f"head_dim {m['head_dim']}). Input: {cfg['tokens_used']} tokens of generated text (seed {cfg['seed']}: documents, "
        f"code, tables, dialogue, facts restated later). Main grid: {len(cfg['main_positions'])} decode positions in the "
        f"last half; at position t the cache is keys 0..t. Overall numbers pool layers >= {cfg['dense_layers']} (the "
        f"first {cfg['dense_layers']} stay dense in the backend). Centre = mean key of the first {cfg['calib']} tokens per "
        f"(layer, kv-head). Selector: {cfg['selector']}; top-p scope: {cfg.get('top_p_scope', 'scored')}{'' if cfg.get('prior_tempered', True) else ' (sink/window mass untempered)'}. Date {res['date']}, wall {res['wall_s']} s, {res['versions']}.",
        "",
        "Metrics per (decode position, query head): *retained* = true attention mass (exact softmax over all keys) on "
        "the attended set (sink + window + selected); *scored* = the share of the scored region's true mass that was "
        "selected; *recall* = share of the oracle top-p set (exact, on the true logits of the scored region) that was "
        "selected; *budget* = attended tokens per query head / cache length; *kv budget* = tokens whose K and V a "
        "kv-head reads (union over its query heads, plus sink and window) / cache length: the memory-traffic cost; "
        "*oracle kv* = the same for the exact top-p sets at p; *ideal kv* = the same for the smallest sets that keep "
        "each head's achieved true mass (what a perfect estimator would read for the same accuracy); *out err* = relative L2 error of the attention output "
        "against dense attention (real V). Goal: retained mean >= p and 5th percentile >= p - "
        f"{cfg['goal_slack']}.",
        "",
        "## Recommended defaults",
        "",
        f"centring **{rec['centring']}**, rounding **{rec['rounding']}**, selection **{rec['selection']}**, "
        f"sink = window = **{rec['sink_window']}**, top_p **{rec['top_p']}**, score temperature **{rec['temperature']}** "
        f"(estimated logits x temperature before top-p). Goal met: **{'yes' if rec['meets_goal'] else 'NO'}**.",
        "",
        f"At these, over layers >= {cfg['dense_layers']} at ~{cfg['tokens_used'] * 3 // 4} tokens of context: retained mass "
        f"mean {_f(o['retained_mean'])}, p5 {_f(o['retained_p5'])}; scored-region share mean {_f(o['retained_scored_mean'])}; "
        f"oracle recall {_f(o['recall_mean'])}; **kv budget {_f(o['kv_budget_mean'])}** (p95 {_f(o['kv_budget_p95'])}; "
        f"an exact selector keeping the same mass would read {_f(o['ideal_kv_budget_mean'])}); out err mean {_f(o['out_err_mean'])}, "
        f"p95 {_f(o['out_err_p95'])}.",
        "",
        f"Plain top-p (temperature 1) variants of the grid meeting the goal: {len(plain)} of {len(res['variants'])}"
        + (": " + ", ".join(f"{v['centring']}/{v['rounding']}/{v['selection']}/p={v['top_p']}/sw={v['sink_window']}" for v in plain[:6]) if plain else "")
        + ".",
        "",
        f"How they were picked (coded in `best_combination()` and `pick_operating_point()`): {rec['rule']}",
        "",
        "### Findings (generated from the numbers below)",
        "",
        *[f"- {x}" for x in findings(res)],
        "",
        "Combination scores (mean of retained mean + p5 over shared budgets; higher is better): "
        + ", ".join(f"{k} {v}" for k, v in rec["combination_scores"].items()),
        "",
        "### Cheapest temperature meeting the goal, per p (recommended combination)",
        "",
        _row(["p", "temperature", "retained mean", "retained p5", "recall", "kv budget", "ideal kv", "out err mean", "out err p95"]),
        _row(["---"] * 9),
    ]
    for c in rec["cheapest_meeting_goal_per_p"]:
        lines.append(_row([c["top_p"], c["temperature"], _f(c["retained_mean"]), _f(c["retained_p5"]), _f(c["recall_mean"]),
                           _f(c["kv_budget_mean"]), _f(c["ideal_kv_budget_mean"]), _f(c["out_err_mean"]), _f(c["out_err_p95"])]))
    lines += [
        "",
        "### p x temperature on the recommended combination",
        "",
        _row(["p", "temperature", "retained mean", "retained p5", "scored mean", "recall", "kv budget", "ideal kv", "out err p95", "goal"]),
        _row(["---"] * 10),
    ]
    for c in sorted(res["calibration"], key=lambda c: (c["top_p"], -c["temperature"])):
        co = c["overall"]
        lines.append(_row([c["top_p"], c["temperature"], _f(co["retained_mean"]), _f(co["retained_p5"]), _f(co["retained_scored_mean"]),
                           _f(co["recall_mean"]), _f(co["kv_budget_mean"]), _f(co["ideal_kv_budget_mean"]), _f(co["out_err_p95"]),
                           "yes" if co["meets_goal"] else "no"]))
    lines += [
        "",
        "## Estimator error (layers pooled as above)",
        "",
        _row(["centring", "rounding", "err mean (cos)", "err std (cos)", "RaBitQ bound", "logit err std", "mean |k-c|/|k|"]),
        _row(["---"] * 7),
    ]
    for e in res["estimator"]:
        eo = e["overall"]
        lines.append(_row([e["centring"], e["rounding"], f"{eo['err_mean']:+.4f}", _f(eo["err_std"], 4), _f(eo["bound"], 4),
                           _f(eo["logit_err_std"]), _f(eo["key_norm_ratio"])]))
    lines += [
        "",
        "Errors are (est - q.k_c) / (|q| |k_c|) over every (query, key) pair of the decode positions. The bound is "
        "RaBitQ's predicted std for an unquantized query (`rabitq_error_bound`), rms over the measured pairs' cosines; "
        "the INT4 query adds a little. *logit err std* = std of (est - q.k_c) / sqrt(D): the noise the selector sees "
        "on each logit, which centring shrinks through |k - c|.",
        "",
        "## Grid at temperature 1 (layers pooled as above)",
        "",
        _row(["centring", "rounding", "selection", "p", "sink=window", "retained mean", "retained p5", "scored mean", "recall",
              "budget", "kv budget", "oracle kv", "ideal kv", "out err mean", "out err p95", "goal"]),
        _row(["---"] * 16),
    ]
    for v in sorted(res["variants"], key=lambda v: (v["centring"], v["rounding"], v["selection"], v["sink_window"], v["top_p"])):
        vo = v["overall"]
        lines.append(_row([v["centring"], v["rounding"], v["selection"], v["top_p"], v["sink_window"], _f(vo["retained_mean"]),
                           _f(vo["retained_p5"]), _f(vo["retained_scored_mean"]), _f(vo["recall_mean"]), _f(vo["budget_mean"]),
                           _f(vo["kv_budget_mean"]), _f(vo["oracle_kv_budget_mean"]), _f(vo["ideal_kv_budget_mean"]), _f(vo["out_err_mean"]), _f(vo["out_err_p95"]),
                           "yes" if vo["meets_goal"] else "no"]))
    est_rec = next((e for e in res["estimator"] if (e["centring"], e["rounding"]) == (rec["centring"], rec["rounding"])), None)
    lines += [
        "",
        f"## Per layer at the recommended defaults (layers < {cfg['dense_layers']} are dense in the backend; shown as if sparse)",
        "",
        _row(["layer", "retained mean", "retained p5", "kv budget", "ideal kv", "out err p95", "err std (cos)", "logit err std"]),
        _row(["---"] * 8),
    ]
    est_rows = _rows(est_rec["per_layer"]) if est_rec else None
    for i, pl in enumerate(_rows(rec["per_layer"])):
        es = est_rows[i] if est_rows else {"err_std": float("nan"), "logit_err_std": float("nan")}
        lines.append(_row([i, _f(pl["retained_mean"]), _f(pl["retained_p5"]), _f(pl["kv_budget_mean"]), _f(pl["ideal_kv_budget_mean"]),
                           _f(pl["out_err_p95"]), _f(es["err_std"], 4), _f(es["logit_err_std"])]))
    if res["context"]:
        lines += [
            "",
            f"## Budget vs context (recommended combination, temperature {rec['temperature']})",
            "",
            f"{cfg['context_positions']} decode positions in [7/8 C, C) per context C.",
            "",
            _row(["context", "p", "retained mean", "retained p5", "recall", "budget", "kv budget", "ideal kv", "out err p95", "goal"]),
            _row(["---"] * 10),
        ]
        for c in sorted(res["context"], key=lambda c: (c["top_p"], c["context"])):
            co = c["overall"]
            lines.append(_row([c["context"], c["top_p"], _f(co["retained_mean"]), _f(co["retained_p5"]), _f(co["recall_mean"]),
                               _f(co["budget_mean"]), _f(co["kv_budget_mean"]), _f(co["ideal_kv_budget_mean"]), _f(co["out_err_p95"]),
                               "yes" if co["meets_goal"] else "no"]))
        if res["budget_extrapolation"]:
            lines += [
                "",
                "**Extrapolation, not a measurement**: a power law kv_budget = a C^b fitted per p over the measured contexts "
                f"(up to {max(c['context'] for c in res['context'])} tokens, this model's limit); the budgets include the fixed "
                "sink and window. Attention patterns and so the budget of a longer-context model at 32K may differ.",
                "",
                _row(["p", "exponent b", "kv budget at 16K (extrap.)", "at 32K (extrap.)"]),
                _row(["---"] * 4),
            ]
            for e in res["budget_extrapolation"]:
                lines.append(_row([e["top_p"], f"{e['exponent']:+.3f}", _f(e["16384"]), _f(e["32768"])]))
    lines += ["", "Plots: " + ", ".join(f"`{n}`" for n in PLOTS), ""]
    return "\n".join(lines)


PLOTS = ("fidelity_mass_vs_budget.png", "fidelity_temperature.png", "fidelity_estimator_by_layer.png", "fidelity_budget_vs_context.png")


def plot(res: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        return out_dir / name

    def mass_axes(axes, title):
        for i, what in enumerate(("mean", "5th percentile")):
            ax = axes[i]
            for p in sorted({v["top_p"] for v in res["variants"]}):
                ax.axhline(p, color="grey", lw=0.5, ls=":")
            ax.set_title(f"{title}: retained true mass ({what})", fontsize=9)
            ax.set_xlabel("kv budget (tokens read / cache length)")
            ax.grid(alpha=0.3)

    files = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sws = sorted({v["sink_window"] for v in res["variants"]})
    fig, axes = plt.subplots(2, len(sws), figsize=(6 * len(sws), 9), squeeze=False)
    combos = sorted({(v["centring"], v["rounding"], v["selection"]) for v in res["variants"]})
    for j, sw in enumerate(sws):
        for ci, combo in enumerate(combos):
            vs = sorted((v for v in res["variants"] if (v["centring"], v["rounding"], v["selection"]) == combo and v["sink_window"] == sw),
                        key=lambda v: v["top_p"])
            xs = [v["overall"]["kv_budget_mean"] for v in vs]
            style = dict(color=colors[ci % len(colors)], marker="o", ls="-" if combo[2] == "union" else "--", label="/".join(combo))
            axes[0, j].plot(xs, [v["overall"]["retained_mean"] for v in vs], **style)
            axes[1, j].plot(xs, [v["overall"]["retained_p5"] for v in vs], **style)
        r = res["recommended"]  # what a perfect estimator would read for the same mass, on the recommended combination
        best = sorted((v for v in res["variants"] if v["sink_window"] == sw and (v["centring"], v["rounding"], v["selection"])
                       == (r["centring"], r["rounding"], r["selection"])), key=lambda v: v["top_p"])
        for i, key in enumerate(("retained_mean", "retained_p5")):
            axes[i, j].plot([v["overall"]["ideal_kv_budget_mean"] for v in best], [v["overall"][key] for v in best], "k:",
                            marker="x", label="exact selection, same mass (recommended combination)")
        mass_axes(axes[:, j], f"temperature 1, sink=window={sw}")
    axes[0, 0].legend(fontsize=7)
    files.append(save(fig, PLOTS[0]))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ti, tau in enumerate(sorted({c["temperature"] for c in res["calibration"]}, reverse=True)):
        cs = sorted((c for c in res["calibration"] if c["temperature"] == tau), key=lambda c: c["top_p"])
        xs = [c["overall"]["kv_budget_mean"] for c in cs]
        for i, key in enumerate(("retained_mean", "retained_p5")):
            axes[i].plot(xs, [c["overall"][key] for c in cs], marker="o", color=colors[ti % len(colors)], label=f"temperature {tau}")
    r = res["recommended"]
    mass_axes(axes, f"{r['centring']}/{r['rounding']}/{r['selection']}/sw={r['sink_window']}")
    axes[0].legend(fontsize=7)
    files.append(save(fig, PLOTS[1]))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for e in res["estimator"]:
        lab = f"{e['centring']}/{e['rounding']}"
        axes[0].plot([s["err_std"] for s in _rows(e["per_layer"])], marker=".", label=lab)
        axes[1].plot([s["logit_err_std"] for s in _rows(e["per_layer"])], marker=".", label=lab)
    for e in res["estimator"]:
        if e["rounding"] == res["estimator"][0]["rounding"]:
            axes[0].plot([s["bound"] for s in _rows(e["per_layer"])], ":", color="k" if e["centring"] == "none" else "grey",
                         label=f"RaBitQ bound ({e['centring']})")
    axes[0].set_title("estimator error std (cosine units)")
    axes[1].set_title("estimated-logit error std: (est - q.k_c) / sqrt(D)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    files.append(save(fig, PLOTS[2]))

    if res["context"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for p in sorted({c["top_p"] for c in res["context"]}):
            pts = sorted((c["context"], c["overall"]["kv_budget_mean"]) for c in res["context"] if c["top_p"] == p)
            line = ax.plot(*zip(*pts), marker="o", label=f"p={p}")[0]
            ex = [e for e in res["budget_extrapolation"] if e["top_p"] == p]
            if ex:  # the fitted power law through its 32K value, over the whole range
                cs = [pts[0][0], 16384, 32768]
                b32 = ex[0]["32768"]
                ax.plot(cs, [b32 * (c / 32768) ** ex[0]["exponent"] for c in cs], ls=":", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens); dotted = power-law extrapolation")
        ax.set_ylabel("kv budget")
        ax.set_title(f"budget vs context (recommended, temperature {r['temperature']})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        files.append(save(fig, PLOTS[3]))
    return files


def load_model(name_or_path: str):
    """A model from an HF folder, or by name through ``eval/fetch_model.py``; returns (model, tokenizer, info)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    if not path.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from fetch_model import fetch

        path = fetch(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok, {"name": name_or_path, "path": str(path)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="HF folder, or a name known to eval/fetch_model.py")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tokens", type=int, default=StudyConfig.tokens)
    ap.add_argument("--positions", type=int, default=StudyConfig.positions)
    ap.add_argument("--context-positions", type=int, default=StudyConfig.context_positions)
    ap.add_argument("--contexts", default=",".join(map(str, StudyConfig.contexts)), help="comma-separated context lengths")
    ap.add_argument("--seed", type=int, default=StudyConfig.seed)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--top-p-scope", choices=("scored", "context"), default=StudyConfig.top_p_scope,
                    help="as --rabitq-top-p-scope: context counts the sink and window's mass towards p")
    ap.add_argument("--untempered-prior", action="store_true",
                    help="with --top-p-scope context: the sink/window logits without the score temperature")
    ap.add_argument("--combination", metavar="CENTRING,ROUNDING,SELECTION,SINK_WINDOW",
                    help="study this one combination only (e.g. none,nearest,union,64): skips the grid search")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md and plots from an existing fidelity.json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        for f in write_outputs(res, Path(args.out), res["command"]):
            print("wrote", f)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = StudyConfig(
        tokens=args.tokens,
        positions=args.positions,
        context_positions=args.context_positions,
        contexts=tuple(int(c) for c in args.contexts.split(",") if c),
        seed=args.seed,
        top_p_scope=args.top_p_scope,
        prior_tempered=not args.untempered_prior,
    )
    if args.combination:
        centring, rounding, selection, sw = args.combination.split(",")
        cfg = replace(cfg, centring=(centring,), rounding=(rounding,), selection=(selection,), sink_window=(int(sw),))
    model, tok, info = load_model(args.model)
    ids = encode_text(tok, cfg)
    info["text_sha256"] = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    res = run_study(model, ids, cfg, info)
    command = "PYTHONPATH=. python eval/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for f in write_outputs(res, Path(args.out), command.strip()):
        print("wrote", f)


if __name__ == "__main__":
    main()
