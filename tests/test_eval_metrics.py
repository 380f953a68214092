"""eval/server.py metrics parsing, bench_decode's decode window and prefix_sharing's agreement (pure CPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402
from eval.bench_decode import combine, decode_stats, write_llama8b_config  # noqa: E402
from eval.prefix_sharing import agreement, prefix_fraction  # noqa: E402

SAMPLE = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m",is_streaming="false"} 1000.0
sglang:prompt_tokens_total{model_name="m",is_streaming="true"} 3000.0
sglang:prompt_tokens_created{model_name="m",is_streaming="true"} 1.7e9
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="m",cache_source="device"} 2500.0
sglang:cache_hit_rate{model_name="m"} 0.42
# HELP sglang_rabitq_attended_tokens_total tokens attended
# TYPE sglang_rabitq_attended_tokens_total counter
sglang_rabitq_attended_tokens_total{layer_group="sparse"} 150.0
sglang_rabitq_attended_tokens_created{layer_group="sparse"} 1.7e9
sglang_rabitq_context_tokens_total 1000.0
sglang_rabitq_codes_reused_total{tp_rank="0"} 7e3
sglang_rabitq_codes_encoded_total{tp_rank="0"} 3000
sglang_rabitq_encode_seconds_total 0.25
sglang:e2e_request_latency_seconds_bucket{le="0.1",model_name="m"} 3.0
sglang:e2e_request_latency_seconds_count{model_name="m"} 3.0
"""


def test_parse_prometheus_sums_label_sets_and_skips_comments():
    m = S.parse_prometheus(SAMPLE)
    assert m["sglang:prompt_tokens_total"] == 4000.0
    assert m["sglang:cache_hit_rate"] == 0.42
    assert m["sglang_rabitq_codes_reused_total"] == 7000.0
    assert not any(k.startswith("#") for k in m)


def test_find_metric_by_prefix():
    m = S.parse_prometheus(SAMPLE)
    assert S.find_metric(m, "sglang_rabitq_attended_tokens") == 150.0  # _created not added
    assert S.find_metric(m, "sglang_rabitq_attended_tokens_total") == 150.0
    assert S.find_metric(m, "sglang:cached_tokens") == 2500.0
    assert S.find_metric(m, "sglang_rabitq_missing") is None
    # a counter exported without the _total suffix and with an extra suffix still matches by prefix
    assert S.find_metric({"sglang_rabitq_codes_reused_count_x": 5.0}, "sglang_rabitq_codes_reused") == 5.0


def test_snapshot_and_delta():
    before = S.snapshot_from(S.parse_prometheus(SAMPLE))
    after_text = SAMPLE.replace("150.0", "450.0").replace("sglang_rabitq_context_tokens_total 1000.0",
                                                          "sglang_rabitq_context_tokens_total 2000.0")
    after_text = after_text.replace("2500.0", "4500.0").replace("3000.0", "5000.0").replace(" 3000\n", " 3500\n")
    d = S.metrics_delta(before, S.snapshot_from(S.parse_prometheus(after_text)))
    assert d["attended"] == 300.0 and d["context"] == 1000.0
    assert d["budget"] == pytest.approx(0.3)
    assert d["prompt_tokens"] == 2000.0 and d["cached_tokens"] == 2000.0
    assert d["cache_hit_rate"] == pytest.approx(1.0)
    assert d["codes_encoded"] == 500 and isinstance(d["codes_encoded"], int)


def test_delta_without_rabitq_metrics_is_null():
    dense = "sglang:prompt_tokens_total{a=\"b\"} 10\n"
    d = S.metrics_delta(S.snapshot_from(S.parse_prometheus(dense)), S.snapshot_from(S.parse_prometheus(
        dense.replace("10", "30"))))
    assert d["budget"] is None and d["codes_reused"] is None
    assert d["cache_hit_rate"] == 0.0  # prompts seen, nothing cached yet


def _req(first, n, dt, start=0.0):
    times = [first + i * dt for i in range(n)]
    return {"start": start, "chunk_times": times, "chunk_tokens": [1] * n}


def test_decode_stats_steady_window():
    # 4 requests, 10 ms per token, first tokens staggered by prefill
    res = [_req(0.1 * i, 100, 0.01) for i in range(4)]
    st = decode_stats(res)
    assert st["window"]
    assert st["tpot_ms"] == pytest.approx(10.0, rel=0.05)
    assert st["tok_s"] == pytest.approx(400.0, rel=0.05)


def test_decode_stats_fallback_without_window():
    res = [_req(0.0, 5, 0.01), _req(1.0, 5, 0.02)]  # never decoding at the same time
    st = decode_stats(res)
    assert not st["window"]
    assert st["tpot_ms"] == pytest.approx(15.0)


def test_combine_reports_speedup_and_amdahl_limit():
    def pt(ctx, tpot):
        return {"context": ctx, "batch": 8, "tpot_ms": tpot, "tok_s": 8e3 / tpot, "budget": 0.1}

    runs = {"dense": {"points": [pt(1024, 10.0), pt(32768, 40.0)], "prefill_ms": {"32768": 100.0}},
            "rabitq": {"points": [pt(1024, 10.0), pt(32768, 20.0)], "prefill_ms": {"32768": 130.0}}}
    rows = {r["context"]: r for r in combine(runs, 1024, "m")}
    assert rows[32768]["speedup"] == pytest.approx(2.0)
    assert rows[32768]["amdahl_limit"] == pytest.approx(4.0)
    assert rows[32768]["encode_overhead_ms"] == pytest.approx(30.0)
    assert rows[1024]["amdahl_limit"] == pytest.approx(1.0)
    assert "always_sparse" not in rows[32768]
    # a third server with every step sparse: its own speedup beside the configured one's
    runs["rabitq-sparse"] = {"points": [pt(1024, 12.5), pt(32768, 16.0)], "prefill_ms": {}}
    rows = {r["context"]: r for r in combine(runs, 1024, "m")}
    assert rows[32768]["always_sparse"]["speedup"] == pytest.approx(2.5)
    assert rows[1024]["always_sparse"]["speedup"] == pytest.approx(0.8) and rows[1024]["speedup"] == pytest.approx(1.0)


def test_llama8b_config(tmp_path):
    import json

    cfg = json.loads((write_llama8b_config(tmp_path / "m") / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (32, 4096, 32, 8, 128, 14336, 128256)
    assert cfg["rope_theta"] == 500000 and cfg["max_position_embeddings"] == 131072


def test_prefix_fraction():
    assert prefix_fraction([1, 2, 3], [1, 2, 3]) == 1.0
    assert prefix_fraction([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert prefix_fraction([], []) == 1.0
    assert prefix_fraction([1], []) == 0.0


def test_agreement_skips_diverged_inputs():
    ref = [{"text": "a b c", "prompt_key": "k1"}, {"text": "x", "prompt_key": "k2"}, {"text": "q", "prompt_key": "k3"}]
    other = [{"text": "a b d", "prompt_key": "k1"}, {"text": "x", "prompt_key": "k2"}, {"text": "q", "prompt_key": "k9"}]
    a = agreement(ref, other, str.split)
    assert a["compared"] == 2 and a["diverged_inputs"] == 1
    assert a["exact"] == 0.5
    assert a["token_prefix"] == pytest.approx((2 / 3 + 1) / 2)
