"""The fidelity study's core (eval/fidelity.py) on a tiny random Llama: CPU, seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import fidelity as fd  # noqa: E402
from sglang_rabitq.reference.codes import encode_keys, estimate_int, quantize_query, random_rotation, unpack_bits  # noqa: E402
from sglang_rabitq.reference.select import top_p_mask, top_p_mask_hist  # noqa: E402

LAYERS, HQ, HKV, D, T = 2, 4, 2, 32, 300


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=HQ,
        num_key_value_heads=HKV, head_dim=D, max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 500, (1, T), generator=torch.Generator().manual_seed(1))
    return model, ids


@pytest.fixture(scope="module")
def qkv(tiny):
    return fd.dump_qkv(*tiny)


def test_dump_shapes(qkv):
    assert qkv["q"].shape == (LAYERS, T, HQ, D)
    assert qkv["k"].shape == (LAYERS, T, HKV, D)
    assert qkv["v"].shape == (LAYERS, T, HKV, D)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in qkv.values())


def test_dump_is_what_attention_used(tiny, qkv):
    """Causal attention recomputed from the captured (post-RoPE) q, k, v equals the model's own attention output."""
    model, ids = tiny
    seen = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0][0].clone()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model.model(input_ids=ids)  # the default attention: the capture must not change the numbers
    finally:
        for h in hooks:
            h.remove()
    for i in range(LAYERS):
        q, k, v = (qkv[n][i].transpose(0, 1) for n in "qkv")  # [H, T, D]
        k, v = k.repeat_interleave(HQ // HKV, 0), v.repeat_interleave(HQ // HKV, 0)
        s = (q @ k.transpose(1, 2)) * D**-0.5
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, HQ * D)
        torch.testing.assert_close(out, seen[i], atol=1e-4, rtol=1e-4)
    # and the keys are post-RoPE: the raw projection differs from them past position 0
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        raw_k = model.model.layers[0].self_attn.k_proj(model.model.layers[0].input_layernorm(emb))[0].view(T, HKV, D)
    torch.testing.assert_close(raw_k[0], qkv["k"][0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw_k[5:], qkv["k"][0, 5:], atol=1e-3)


def _grid(**over):
    g = {"centring": ("none", "calibrate"), "rounding": ("nearest", "random"), "selection": ("head", "union"),
         "top_p": (0.5, 0.8, 0.95), "sink_window": (16,), "temperature": (1.0,)}
    return g | over


def _eval(qkv, layer, grid, positions=range(150, 300, 10), scope="scored"):
    rot = random_rotation(D, seed=layer, num_heads=HKV)
    center = qkv["k"][layer, :64].mean(0)
    return fd.eval_layer(qkv["q"][layer], qkv["k"][layer], qkv["v"][layer], list(positions), rot, center, grid,
                         torch.Generator().manual_seed(0), scope=scope)


def test_p1_keeps_everything(qkv):
    res = _eval(qkv, 1, _grid(top_p=(1.0,)))
    assert len(res.metrics) == 8
    for key, m in res.metrics.items():
        torch.testing.assert_close(m["retained"], torch.ones_like(m["retained"]), atol=1e-5, rtol=0, msg=str(key))
        assert float(m["out_err"].max()) < 1e-4, key
        assert float(m["recall"].min()) == 1.0, key
        torch.testing.assert_close(m["kv_budget"], torch.ones_like(m["kv_budget"]), atol=1e-9, rtol=0)


def test_budget_and_mass_grow_with_p(qkv):
    res = _eval(qkv, 1, _grid())
    for c, r, s in [(c, r, s) for c in ("none", "calibrate") for r in ("nearest", "random") for s in ("head", "union")]:
        ms = [res.metrics[c, r, s, p, 16, 1.0] for p in (0.5, 0.8, 0.95)]
        for a, b in zip(ms, ms[1:]):
            # sets are nested in p: per sample, never fewer tokens nor less mass
            assert (b["budget"] >= a["budget"]).all() and (b["kv_budget"] >= a["kv_budget"]).all()
            assert (b["retained"] >= a["retained"] - 1e-6).all()
        assert ms[-1]["budget"].mean() > ms[0]["budget"].mean()
        if s == "union":  # the union is a superset of each head's own set
            head = res.metrics[c, r, "head", 0.8, 16, 1.0]
            assert (res.metrics[c, r, s, 0.8, 16, 1.0]["retained"] >= head["retained"] - 1e-6).all()
    assert 0 < float(ms[0]["budget"].mean()) < 1


def test_lower_temperature_widens(qkv):
    # a random model's attention is almost flat (logits within a bin or two); sharpen it so selection has work
    sharp = {"q": qkv["q"] * 8, "k": qkv["k"], "v": qkv["v"]}
    res = _eval(sharp, 1, _grid(temperature=(1.0, 0.5), selection=("union",), centring=("none",), rounding=("nearest",)))
    for p in (0.5, 0.8):
        assert res.metrics["none", "nearest", "union", p, 16, 0.5]["kv_budget"].mean() > \
            res.metrics["none", "nearest", "union", p, 16, 1.0]["kv_budget"].mean()


def test_estimator_stats_are_sane(qkv):
    # keys with a common offset (as real models have): centring on the calibration mean must remove most of it
    offset = {"q": qkv["q"], "k": qkv["k"] + 3 * qkv["k"].std(), "v": qkv["v"]}
    res = _eval(offset, 1, _grid(top_p=(0.9,)))
    for key, st in res.estimator.items():
        assert abs(st["err_mean"]) < 0.05, key
        assert 0.3 * st["bound"] < st["err_std"] < 3 * st["bound"], key
    assert res.estimator["none", "nearest"]["key_norm_ratio"] == pytest.approx(1.0)
    assert res.estimator["calibrate", "nearest"]["key_norm_ratio"] < 0.6
    assert res.estimator["calibrate", "nearest"]["logit_err_std"] < 0.8 * res.estimator["none", "nearest"]["logit_err_std"]


def test_estimate_logits_matches_estimate_int():
    gen = torch.Generator().manual_seed(3)
    k, q = torch.randn(50, HKV, D, generator=gen), torch.randn(3, HQ, D, generator=gen)
    rot = random_rotation(D, 5, HKV)
    codes, factor = encode_keys(k, rot, k.mean(0))
    q_u, delta, qmin = quantize_query(q, rot)
    q_bar = delta.double()[..., None] * q_u + qmin.double()[..., None]
    got = fd.estimate_logits(q_bar, unpack_bits(codes).double() * 2 - 1, factor.double())
    g = HQ // HKV
    for b in range(3):
        for h in range(HQ):
            ref = estimate_int(codes[:, h // g], factor[:, h // g], q_u[b, h], delta[b, h], qmin[b, h])
            torch.testing.assert_close(got[b, h], ref, atol=1e-9, rtol=1e-9)


def test_batched_selectors_match_reference():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 900, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 8, 40, dtype=torch.float64)[:, None]
    x[::5, :300] = float("-inf")
    x[3] = float("-inf")
    finite = torch.isfinite(x)
    oracle = fd.oracle_masks(x, (0.3, 0.8, 0.95, 1.0))
    for p in (0.3, 0.8, 0.95, 1.0):
        assert torch.equal(fd.hist_keep(x, p), top_p_mask_hist(torch.where(finite, x, 0.0), p, finite)), p
        assert torch.equal(oracle[p], top_p_mask(x, p)), p
        prior = torch.logsumexp(x, -1) + torch.linspace(-4, 2, 40, dtype=torch.float64)  # a sink/window mass
        assert torch.equal(fd.hist_keep(x, p, prior), top_p_mask_hist(torch.where(finite, x, 0.0), p, finite, prior)), p
    assert fd.pick_selector().batched


def test_context_scope_keeps_a_subset_of_the_scored_scope(qkv):
    # the sink and window's mass counts towards p: a head's set can only shrink, and for some it does
    grid = _grid(selection=("head",), centring=("none",), rounding=("nearest",))
    runs = {scope: _eval(qkv, 1, grid, scope=scope) for scope in ("scored", "context")}
    for p in (0.5, 0.8, 0.95):
        key = ("none", "nearest", "head", p, 16, 1.0)
        context, scored = runs["context"].metrics[key]["budget"], runs["scored"].metrics[key]["budget"]
        assert (context <= scored + 1e-9).all() and (context < scored).any(), p


def test_text_is_deterministic_and_long():
    a, qa = fd.build_text(0, 5000)
    b, _ = fd.build_text(0, 5000)
    c, _ = fd.build_text(1, 5000)
    assert a == b and a != c and len(a) >= 5000 and "locker" in qa


def test_study_outputs(tiny, tmp_path):
    model, ids = tiny
    cfg = fd.StudyConfig(
        tokens=T, positions=8, calib=64, dense_layers=1, top_p=(0.8, 0.95), sink_window=(16, 32),
        contexts=(128, 256, 1024), context_positions=4, calib_top_p=(0.8, 0.95), temperatures=(1.0, 0.6),
    )
    res = fd.run_study(model, ids, cfg, {"name": "tiny-llama"}, log=lambda *_: None)
    files = fd.write_outputs(res, tmp_path, "python eval/fidelity.py --test")
    data = json.loads((tmp_path / "fidelity.json").read_text())
    for key in ("schema", "command", "date", "versions", "model", "config", "estimator", "variants", "calibration",
                "recommended", "context", "budget_extrapolation", "wall_s"):
        assert key in data, key
    assert data["model"]["head_dim"] == D and data["model"]["kv_heads"] == HKV
    assert len(data["variants"]) == 2 * 2 * 2 * 2 * 2  # centring x rounding x selection x p x sink/window
    v = data["variants"][0]
    for key in ("centring", "rounding", "selection", "top_p", "sink_window", "temperature", "overall", "per_layer", "dense_layers"):
        assert key in v, key
    for key in ("retained_mean", "retained_p5", "recall_mean", "budget_mean", "kv_budget_mean", "out_err_mean", "meets_goal"):
        assert key in v["overall"], key
    assert all(len(col) == LAYERS for col in v["per_layer"].values())  # columnar: metric -> value per layer
    assert set(v["per_layer"]) == set(v["overall"]) - {"meets_goal"}
    assert len(data["estimator"]) == 4 and "bound" in data["estimator"][0]["overall"]
    assert len(data["calibration"]) == 2 * 2
    rec = data["recommended"]
    for key in ("centring", "rounding", "selection", "sink_window", "top_p", "temperature", "meets_goal", "overall", "rule"):
        assert key in rec, key
    assert sorted({c["context"] for c in data["context"]}) == [128, 256]  # 1024 > the 300-token input: skipped
    md = (tmp_path / "fidelity.md").read_text()
    assert md.splitlines()[2] == "Command: `python eval/fidelity.py --test`"
    assert "Recommended defaults" in md and "Extrapolation" in md
    assert all(f.exists() for f in files)
