"""eval/summary.py builds exactly the summary schema from small fake result files."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import summary as SM  # noqa: E402

META = {"gpu": "NVIDIA H100 80GB HBM3", "sglang": "0.5.17", "model": "/tmp/models/qwen05",
        "date": "2026-11-23T10:00:00+00:00", "command": "python eval/x.py"}
ACC = {**META, "rows": [
    {"task": "niah_single", "context": 4096, "backend": "dense", "top_p": None, "score": 100.0, "budget": None, "n": 3},
    {"task": "niah_single", "context": 4096, "backend": "rabitq", "top_p": 0.9, "score": 66.7, "budget": 0.12, "n": 3},
    {"task": "qa", "context": 4096, "backend": "rabitq", "top_p": 0.95, "score": 50, "budget": None, "n": 3},
]}
SPEED = {**META, "rows": [
    {"model": "qwen05", "context": 8192, "batch": 8, "dense_tok_s": 1000.0, "rabitq_tok_s": 1500.0, "speedup": 1.5,
     "budget": 0.1, "amdahl_limit": 2.0, "encode_overhead_ms": 3.0},
    {"model": "qwen05", "context": 16384, "batch": 8, "dense_tok_s": 800, "rabitq_tok_s": 1400, "speedup": 1.75,
     "budget": None, "amdahl_limit": None, "encode_overhead_ms": None},
]}
PREFIX = {**META, "summary": {"agreement": 0.8, "codes_reused": 1200.0, "codes_encoded": 300,
                              "dense_tpot_ms": 5.0, "rabitq_tpot_ms": 4}, "table": [["TPOT ms (all)", 5.0, 4.0]]}

SCHEMA_TOP = {"gpu", "sglang", "model", "date", "accuracy", "speed", "prefix_sharing"}
ACC_KEYS = {"task", "context", "backend", "top_p", "score", "budget", "score_temperature", "n"}  # the issue's + 2
SPEED_KEYS = {"model", "context", "batch", "dense_tok_s", "rabitq_tok_s", "speedup", "budget", "gpu"}  # the issue's + 1
PREFIX_KEYS = {"agreement", "codes_reused", "codes_encoded", "dense_tpot_ms", "rabitq_tpot_ms"}


def check_schema(s):
    assert set(s) == SCHEMA_TOP
    assert all(isinstance(s[k], str) for k in ("gpu", "sglang", "model", "date"))
    for r in s["accuracy"]:
        assert set(r) == ACC_KEYS
        assert isinstance(r["task"], str) and isinstance(r["context"], int) and r["backend"] in ("dense", "rabitq")
        assert r["top_p"] is None or isinstance(r["top_p"], float)
        assert isinstance(r["score"], float) and (r["budget"] is None or isinstance(r["budget"], float))
        if r["backend"] == "dense":
            assert r["top_p"] is None
    for r in s["speed"]:
        assert set(r) == SPEED_KEYS
        assert isinstance(r["model"], str) and isinstance(r["context"], int) and isinstance(r["batch"], int)
        for k in ("dense_tok_s", "rabitq_tok_s", "speedup"):
            assert isinstance(r[k], float)
    ps = s["prefix_sharing"]
    assert set(ps) == PREFIX_KEYS
    for k in ("codes_reused", "codes_encoded"):
        assert ps[k] is None or isinstance(ps[k], int)


def test_build_summary_schema():
    s = SM.build_summary([ACC], [SPEED], PREFIX)
    check_schema(s)
    assert s["gpu"] == META["gpu"] and s["sglang"] == "0.5.17"
    assert len(s["accuracy"]) == 3 and len(s["speed"]) == 2
    assert s["prefix_sharing"]["codes_reused"] == 1200 and s["prefix_sharing"]["rabitq_tpot_ms"] == 4.0
    assert s["accuracy"][1]["top_p"] == 0.9 and s["accuracy"][1]["budget"] == 0.12
    json.dumps(s)  # plain JSON


def test_summary_of_several_gpus_names_them_all():
    # the same model, context and batch on a second GPU: its own row, with its own limit and encode time
    h200 = {**SPEED, "gpu": "NVIDIA H200", "date": "2026-12-01T20:00:00+00:00",
            "rows": [{**SPEED["rows"][0], "speedup": 1.25, "amdahl_limit": 3.0, "encode_overhead_ms": 7.0}]}
    s = SM.build_summary([ACC], [SPEED, h200], PREFIX)
    check_schema(s)
    assert s["gpu"] == "NVIDIA H100 80GB HBM3, NVIDIA H200" and s["date"] == h200["date"]
    assert [r["gpu"] for r in s["speed"]] == [META["gpu"], META["gpu"], "NVIDIA H200"]
    table = "\n".join(SM.speed_table(s["speed"], SM.raw_speed_rows([SPEED, h200])))
    assert "| NVIDIA H100 80GB HBM3 | qwen05 | 8192 | 8 | 1000 | 1500 | 1.50 | 2.00 | 10.0% | 3.0 |" in table
    assert "| NVIDIA H200 | qwen05 | 8192 | 8 | 1000 | 1500 | 1.25 | 3.00 | 10.0% | 7.0 |" in table


def test_accuracy_of_several_runs_keeps_the_larger_sample_and_each_temperature(tmp_path):
    row = {"task": "qa", "context": 32768, "backend": "dense", "top_p": None, "budget": None}
    grid = {**META, "rows": [{**row, "score": 40.0, "n": 5},
                             {**row, "backend": "rabitq", "top_p": 0.8, "score": 40.0, "budget": 0.44, "n": 5}]}
    sweep = {**META, "rows": [{**row, "score": 50.0, "n": 10, "score_temperature": None},
                              *({**row, "backend": "rabitq", "top_p": 0.8, "score_temperature": t, "score": sc,
                                 "budget": b, "n": 10} for t, sc, b in ((0.8, 50.0, 0.3), (1.0, 30.0, 0.15)))]}
    s = SM.build_summary([grid, sweep], [], None)
    check_schema(s)
    by = {(r["backend"], r["top_p"], r["score_temperature"]): r for r in s["accuracy"]}
    assert len(s["accuracy"]) == 4 and by[("dense", None, None)]["score"] == 50.0  # 10 samples over 5
    assert by[("rabitq", 0.8, None)]["budget"] == 0.44 and by[("rabitq", 0.8, 1.0)]["score"] == 30.0
    table = "\n".join(SM.accuracy_table(s["accuracy"]))
    assert "| dense (10/task) | rabitq p=0.8 (5/task) | rabitq p=0.8 t=0.8 (10/task) | rabitq p=0.8 t=1.0 (10/task) |" in table
    assert "| qa | 32768 | 50.0 | 40.0 (44%) | 50.0 (30%) | 30.0 (15%) |" in table


def test_speed_rows_name_the_top_p_temperature_cap_key_bits_and_threshold_their_run_served_at():
    runs = [{**SPEED, "prompts": "text", "config": {"top_p": 0.8, "rabitq_args": "--rabitq-score-temperature 1.0"}},
            {**SPEED, "prompts": "text", "config": {"top_p": 0.9, "rabitq_args": ""}},
            {**SPEED, "prompts": "random", "config": {"top_p": 0.9, "rabitq_args": "--rabitq-max-budget=0.1"}},
            {**SPEED, "prompts": "text", "config": {"top_p": 0.9, "rabitq_args": "--rabitq-max-budget 0.1 "
                                                                                  "--rabitq-min-batch-context 0"}},
            {**SPEED, "prompts": "text", "config": {"top_p": 0.9, "rabitq_args": "--rabitq-key-bits 3"}}]
    s = SM.build_summary([], runs, None)
    assert {r["model"] for r in s["speed"]} == {"qwen05 (text prompts, p 0.8, t 1.0)", "qwen05 (text prompts, p 0.9)",
                                                "qwen05 (random prompts, p 0.9, cap 0.1)",
                                                "qwen05 (text prompts, p 0.9, cap 0.1, every step sparse)",
                                                "qwen05 (text prompts, p 0.9, 3-bit keys)"}
    assert SM.flag_value("--rabitq-score-temperature=0.5 --rabitq-score-temperature 0.7", "--rabitq-score-temperature") == "0.7"


def test_build_summary_from_nothing():
    s = SM.build_summary([], [], None)
    check_schema(s)
    assert s["accuracy"] == [] and s["speed"] == [] and s["prefix_sharing"]["agreement"] is None


def test_main_writes_json_markdown_and_plots(tmp_path):
    for name, d in (("accuracy.json", ACC), ("speed.json", SPEED), ("prefix_sharing.json", PREFIX)):
        (tmp_path / name).write_text(json.dumps(d))
    SM.main(["--accuracy", str(tmp_path / "accuracy.json"), "--speed", str(tmp_path / "speed.json"),
             "--prefix", str(tmp_path / "prefix_sharing.json"), "--out-dir", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    check_schema(s)
    md = (tmp_path / "summary.md").read_text()
    assert "niah_single" in md and "1.50" in md and "| agreement | 0.8 |" in md
    assert "66.7 (12%)" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 1000
    assert (tmp_path / "speedup_vs_context.png").stat().st_size > 1000


def test_gpu_suite_records_every_step_and_goes_on_after_a_failure(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "suite"
    subprocess.run(["bash", str(root / "eval" / "gpu_suite.sh"), "unused-model", str(out), "nosuchstep", "summary"],
                   check=True, capture_output=True, timeout=120)
    progress = (out / "progress").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in progress] == ["start nosuchstep", "end nosuchstep rc=2",
                                                            "start summary", "end summary rc=0"]
    assert json.loads((out / "summary.json").read_text())["speed"] == []  # no inputs: empty sections


def test_gpu_suite_runs_comma_joined_steps_together_and_records_both(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "suite"
    subprocess.run(["bash", str(root / "eval" / "gpu_suite.sh"), "unused-model", str(out), "nosuchstep,summary", "other"],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "POLL_S": "0.1"})
    events = [line.split(" ", 1)[1] for line in (out / "progress").read_text().splitlines()]
    assert sorted(events[:4]) == sorted(["start nosuchstep", "end nosuchstep rc=2", "start summary", "end summary rc=0"])
    assert events[4:] == ["start other", "end other rc=2"]  # the next group waits for the whole first one


def test_accuracy_of_two_models_is_refused(tmp_path):
    other = {**ACC, "model": "/tmp/models/smollm2"}
    for name, d in (("a.json", ACC), ("b.json", other)):
        (tmp_path / name).write_text(json.dumps(d))
    with pytest.raises(SystemExit):
        SM.main(["--accuracy", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir", str(tmp_path)])
    SM.main(["--accuracy", str(tmp_path / "a.json"), "--out-dir", str(tmp_path)])
    assert "## Accuracy (RULER-style tasks; /tmp/models/qwen05)" in (tmp_path / "summary.md").read_text()
