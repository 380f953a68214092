"""The eval drivers end to end against a fake SGLang server (this file, run as a script), on CPU in seconds.

The fake speaks the endpoints the drivers use: /health_generate, /server_info, /flush_cache, /start_profile, /metrics
(Prometheus text with SGLang's and, for --attention-backend rabitq, the rabitq counters), streaming and plain
/v1/chat/completions, /v1/completions, and streaming /generate. Answers are read out of the prompt (so scores are not trivial);
the rabitq fake gets every fifth answer wrong so agreement < 1 is visible.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -------------------------------------------------------------------------------------------- fake server


class Fake:
    lock = threading.Lock()
    counters = {"prompt": 0.0, "cached": 0.0, "attended": 0.0, "context": 0.0, "reused": 0.0, "encoded": 0.0}
    # like sglang_rabitq.stats: rabitq counters reach /metrics only at a batch >= LOG_EVERY_S after the last export
    exported = dict(counters)
    last_export = 0.0
    every_s = float(os.environ.get("SGLANG_RABITQ_LOG_EVERY_S", "10"))
    prompts: list[str] = []
    backend = "flashinfer"
    top_p = None
    temperature = None


def fake_answer(prompt: str, last: str) -> str:
    q = last.rsplit("\n\n", 1)[-1]
    m = re.search(r"magic numbers? for (\S+) mentioned", q)
    if m:
        vals = re.findall(rf"magic numbers for {re.escape(m.group(1))} is: (\d+)", prompt)
        ans = ", ".join(vals)
    elif (m := re.search(r"town of (\w+)|founded (\w+)\?|founder of (\w+)|founding of (\w+)", q)):
        town = next(g for g in m.groups() if g)
        f = re.search(rf"{town}\. {town} is a town near [^.]*\. It was founded by ([\w ]+) in", prompt)
        ans = f"{town} was founded by {f.group(1)}." if f else "I do not know."
    else:
        ans = "I do not know the answer to that question."
    if Fake.backend == "rabitq" and int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 5 == 0:
        ans = "Something different entirely."
    return ans


def account(prompt: str, n_out: int) -> tuple[int, int]:
    """Prompt/cached tokens (4 chars each, cached = longest common prefix with an earlier prompt)."""
    with Fake.lock:
        best = 0
        for p in Fake.prompts:
            n = len(os.path.commonprefix([p, prompt]))
            best = max(best, n)
        Fake.prompts.append(prompt)
        pt, ct = len(prompt) // 4, best // 4
        Fake.counters["prompt"] += pt
        Fake.counters["cached"] += ct
        if Fake.backend == "rabitq":
            Fake.counters["context"] += n_out * pt
            # a budget of 2 (1 - p) / t: as on real attention, a lower score temperature widens the selection
            Fake.counters["attended"] += n_out * pt * (1 - (Fake.top_p or 0.9)) * 2 / (Fake.temperature or 1.0)
            Fake.counters["reused"] += ct
            Fake.counters["encoded"] += pt - ct
    return pt, ct


def batch_done() -> None:
    with Fake.lock:
        if time.monotonic() - Fake.last_export >= Fake.every_s:
            Fake.exported, Fake.last_export = dict(Fake.counters), time.monotonic()


def write_fake_trace(folder: str, steps: int) -> None:
    """A chrome trace like torch.profiler's: dense replays one CUDA graph per step; the rabitq fake
    launches its 3 kernels one by one and syncs once per step."""
    events, t = [], 0.0
    for _ in range(steps):
        if Fake.backend == "rabitq":
            events += [{"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": t + i, "dur": 5} for i in range(3)]
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": t + 50, "dur": 40})
        else:
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 8})
        events += [{"ph": "X", "cat": "kernel", "name": f"void attn_kernel<{i}>(float*)" if i == 0 else f"gemm_{i}",
                    "ts": t + 10 + 20 * i, "dur": 20} for i in range(3)]
        t += 100.0
    path = Path(folder) / "fake-TP-0.trace.json.gz"
    with gzip.open(path.with_suffix(".tmp"), "wt") as f:
        json.dump({"traceEvents": events}, f)
    path.with_suffix(".tmp").rename(path)


def metrics_text() -> str:
    c = {**Fake.exported, "prompt": Fake.counters["prompt"], "cached": Fake.counters["cached"]}
    lines = ["# HELP sglang:prompt_tokens_total x", "# TYPE sglang:prompt_tokens_total counter",
             f'sglang:prompt_tokens_total{{model_name="fake",is_streaming="true"}} {c["prompt"]}',
             f'sglang:cached_tokens_total{{model_name="fake",cache_source="device"}} {c["cached"]}']
    if Fake.backend == "rabitq":
        lines += [f"sglang_rabitq_attended_tokens_total {c['attended']}",
                  "sglang_rabitq_attended_tokens_created 1.7e9",
                  f"sglang_rabitq_context_tokens_total {c['context']}",
                  f'sglang_rabitq_codes_reused_total{{tp_rank="0"}} {c["reused"]}',
                  f'sglang_rabitq_codes_encoded_total{{tp_rank="0"}} {c["encoded"]}',
                  f"sglang_rabitq_encode_seconds_total {c['encoded'] * 1e-6}"]
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, obj):
        self.wfile.write(f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode())
        self.wfile.flush()

    def do_GET(self):
        if self.path.startswith("/health"):
            batch_done()
            self._send(200, "")
        elif self.path.startswith("/metrics"):
            self._send(200, metrics_text(), "text/plain")
        elif self.path.startswith("/server_info"):
            self._send(200, json.dumps({"max_total_num_tokens": 50_000, "version": "fake"}))
        else:
            self._send(404, "{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.startswith("/flush_cache"):
            with Fake.lock:
                Fake.prompts.clear()
            print("flush_cache", flush=True)
            self._send(200, "")
        elif self.path.startswith("/start_profile"):
            write_fake_trace(body["output_dir"], body["num_steps"])
            self._send(200, "Succeeded")
        elif self.path.startswith("/v1/chat/completions"):
            self.chat(body)
        elif self.path.startswith("/v1/completions"):
            words = fake_answer(body["prompt"], body["prompt"]).split(" ")[: body.get("max_tokens", 16)]
            batch_done()
            self._send(200, json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "fake",
                                        "choices": [{"index": 0, "text": " ".join(words), "finish_reason": "stop"}]}))
        elif self.path.startswith("/generate"):
            self.generate(body)
        else:
            self._send(404, "{}")

    def chat(self, body):
        prompt = "\n".join(m["content"] for m in body["messages"])
        words = fake_answer(prompt, body["messages"][-1]["content"]).split(" ")[: body.get("max_tokens", 16)]
        pt, ct = account(prompt, len(words))
        batch_done()
        usage = {"prompt_tokens": pt, "completion_tokens": len(words), "total_tokens": pt + len(words),
                 "prompt_tokens_details": {"cached_tokens": ct} if ct else None}
        base = {"id": "x", "created": 0, "model": "fake"}
        if not body.get("stream"):
            msg = {"role": "assistant", "content": " ".join(words)}
            self._send(200, json.dumps({**base, "object": "chat.completion", "usage": usage,
                                        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}))
            return
        self._sse_start()
        for i, w in enumerate(words):
            time.sleep(0.002)
            delta = {"role": "assistant", "content": (" " if i else "") + w}
            self._sse({**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        self._sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        self._sse("[DONE]")

    def generate(self, body):
        ids = body["input_ids"]
        n = body["sampling_params"]["max_new_tokens"]
        account(" ".join(map(str, ids[:64])) + str(len(ids)), n)
        batch_done()
        self._sse_start()
        time.sleep(len(ids) * 1e-6)
        for i in range(1, n + 1):
            time.sleep(0.001)
            self._sse({"output_ids": list(range(i)), "meta_info": {"completion_tokens": i, "prompt_tokens": len(ids)}})
        self._sse("[DONE]")


def serve():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--attention-backend")
    ap.add_argument("--rabitq-top-p", type=float)
    ap.add_argument("--rabitq-score-temperature", type=float)
    args, _ = ap.parse_known_args()
    Fake.backend, Fake.top_p, Fake.temperature = args.attention_backend, args.rabitq_top_p, args.rabitq_score_temperature
    print("fake sglang", sys.argv, flush=True)
    print("fake triton cache", os.environ.get("TRITON_CACHE_DIR"), flush=True)
    print("max_total_num_tokens=50000", flush=True)  # what SGLang logs once its KV pool is sized
    if args.attention_backend == "rabitq":  # the backend's startup line, its config resolved for head dim 64
        from sglang_rabitq.config import RaBitQConfig

        cfg = RaBitQConfig(top_p=args.rabitq_top_p, score_temperature=args.rabitq_score_temperature).for_head_dim(64)
        print(f"rabitq: {cfg}; 22 of 24 layers sparse", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


# ------------------------------------------------------------------------------------------------- tests

if __name__ != "__main__":
    import pytest

    sys.path.insert(0, str(ROOT))
    from eval import accuracy, bench_decode, e2e_smoke, prefix_sharing, profile_decode, summary  # noqa: E402
    from eval import server as eval_server  # noqa: E402
    from eval.server import Server  # noqa: E402

    @pytest.fixture
    def fake(monkeypatch, tmp_path):
        monkeypatch.setenv("EVAL_SGLANG_LAUNCHER", str(Path(__file__).resolve()))
        # rabitq servers get SGLANG_RABITQ_LOG_EVERY_S from server_for (the fake's default is 10 s, as the
        # backend's); 0.2 s here, and the drivers wait --metrics-settle 0.3
        monkeypatch.delenv("SGLANG_RABITQ_LOG_EVERY_S", raising=False)
        monkeypatch.setattr(eval_server, "METRICS_EVERY_S", 0.2)
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"max_position_embeddings": 8192, "vocab_size": 1000}))
        return model

    def _port():
        """A base port whose +10 i neighbours (one a driver's server start) are free now; below Linux's
        ephemeral range (32768 up), where no client connection's local port can take them meanwhile."""
        import random

        while True:
            base = random.randrange(20000, 32000, 100)
            if all(eval_server.port_is_free("127.0.0.1", base + k) for k in range(0, 100, 10)):
                return base

    def test_server_context_manager_starts_and_kills(fake, tmp_path):
        with Server(str(fake), "flashinfer", port=_port(), log_path=tmp_path / "s.log", timeout=30) as srv:
            pid = srv.proc.pid
            assert srv.startup_s is not None
            from eval.server import http_get, rabitq_snapshot

            assert http_get(srv.url + "/health_generate")[0] == 200
            assert rabitq_snapshot(srv.url)["attended"] is None
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert "fake sglang" in (tmp_path / "s.log").read_text()

    def test_server_moves_off_a_port_in_use(fake, tmp_path):
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", _port()))
            taken.listen()
            port = taken.getsockname()[1]
            with Server(str(fake), "flashinfer", port=port, log_path=tmp_path / "s.log", timeout=30) as srv:
                assert srv.port == port + 1 and srv.url.endswith(f":{port + 1}")
                assert eval_server.http_get(srv.url + "/health_generate")[0] == 200
            assert f"--port {port + 1}" in (tmp_path / "s.log").read_text()
            with pytest.raises(RuntimeError, match="all in use"):
                Server(str(fake), "flashinfer", port=port, log_path=tmp_path / "t.log")._take_free_port(tries=1)

    def test_server_that_dies_raises_with_log(fake, tmp_path):
        with pytest.raises(RuntimeError, match="exited"):
            with Server(str(fake), "flashinfer", port=_port(), extra_args=["--port", "notaport"],
                        log_path=tmp_path / "bad.log", timeout=30):
                pass

    def test_servers_launched_one_after_another_wait_for_their_logs(fake, tmp_path):
        port = _port()
        servers = [Server(str(fake), "flashinfer", port=port + 10 * i, log_path=tmp_path / f"s{i}.log", timeout=30)
                   for i in range(2)]
        try:
            for srv in servers:
                srv.launch()
                srv.wait_for_log("fake sglang")  # what the fake prints once it runs
            for srv in servers:
                srv.wait_ready()
                assert srv.startup_s is not None
        finally:
            for srv in servers:
                srv.stop()
        dead = Server(str(fake), "flashinfer", port=port + 20, extra_args=["--port", "notaport"],
                      log_path=tmp_path / "dead.log", timeout=30)
        dead.launch()
        with pytest.raises(RuntimeError, match="exited"):
            dead.wait_for_log("never printed")
        assert dead.proc is None  # stopped on the way out

    @pytest.mark.parametrize("parallel", [1, 2])
    def test_accuracy_driver(fake, tmp_path, parallel):
        out = tmp_path / "accuracy.json"
        res = accuracy.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--contexts", "1024",
                             "--samples", "2", "--top-p", "0.8,0.95", "--tasks", "niah_single,niah_multivalue,qa",
                             "--metrics-settle", "0.3", "--parallel", str(parallel)])
        data = json.loads(out.read_text())
        assert data["command"] and data["sglang"] is not None and data["gpu"]
        rows = {(r["task"], r["backend"], r["top_p"]): r for r in data["rows"]}
        assert len(rows) == 9
        assert rows[("niah_single", "dense", None)]["score"] == 100.0  # the fake reads the needle
        assert rows[("niah_single", "dense", None)]["budget"] is None
        assert rows[("qa", "rabitq", 0.8)]["budget"] == pytest.approx(0.4)
        assert rows[("qa", "rabitq", 0.95)]["budget"] == pytest.approx(0.1)
        assert len(res["runs"]) == 3 and all("error" not in r for r in res["runs"])

    def test_accuracy_driver_runs_every_top_p_at_every_temperature_then_picks_the_cheapest(fake, tmp_path):
        from eval import operating_point

        out = tmp_path / "accuracy.json"
        accuracy.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--contexts", "1024",
                       "--samples", "2", "--top-p", "0.8,0.9", "--score-temperature", "0.5,1",
                       "--tasks", "niah_single", "--metrics-settle", "0.3", "--parallel", "2"])
        rows = {(r["backend"], r["top_p"], r["score_temperature"]): r for r in json.loads(out.read_text())["rows"]}
        assert sorted(rows, key=str) == sorted([("dense", None, None), ("rabitq", 0.8, 0.5), ("rabitq", 0.9, 0.5),
                                                ("rabitq", 0.8, 1.0), ("rabitq", 0.9, 1.0)], key=str)
        assert rows[("rabitq", 0.8, 0.5)]["budget"] == pytest.approx(0.8)  # the fake's 2 (1 - p) / t
        assert rows[("rabitq", 0.8, 1.0)]["budget"] == pytest.approx(0.4)
        assert rows[("rabitq", 0.9, 1.0)]["budget"] == pytest.approx(0.2)
        # the fake answers a prompt wrong on rabitq by its hash, the same one at every configuration
        drop = rows[("dense", None, None)]["score"] - rows[("rabitq", 0.9, 1.0)]["score"]
        assert operating_point.main([str(out), "--context", "1024", "--max-drop", str(drop)]) == (0.9, 1.0)

    def test_prefix_sharing_driver(fake, tmp_path):
        out = tmp_path / "prefix_sharing.json"
        res = prefix_sharing.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--docs", "2",
                                   "--doc-tokens", "1500", "--users", "6", "--concurrency", "1,3", "--chats", "2",
                                   "--turns", "3", "--metrics-settle", "0.3"])
        data = json.loads(out.read_text())
        dense, ours = data["runs"]["dense"], data["runs"]["rabitq"]
        assert dense["levels"][0]["correct"] == dense["chats"]["correct"] == 100.0
        assert dense["totals"]["cache_hit_rate"] > 0.5  # same documents: long shared prefixes
        assert ours["totals"]["codes_reused"] > ours["totals"]["codes_encoded"] > 0
        # what the server logged it ran with: --top-p, and the head-dim defaults for the flags not given
        assert {k: ours["rabitq_config"][k] for k in ("top_p", "score_temperature", "key_bits")} == \
            {"top_p": 0.9, "score_temperature": 1.0, "key_bits": 3}
        assert "rabitq_config" not in dense
        assert 0.0 < data["agreement"]["overall"]["exact"] < 1.0
        assert data["agreement"]["overall"]["compared"] + data["agreement"]["overall"]["diverged_inputs"] == 6 * 2 + 2 * 3
        assert dense["repeat"]["self_exact"] == 1.0
        assert res["summary"]["dense_tpot_ms"] > 0 and res["summary"]["codes_reused"] > 0
        # the summary rebuilds the table from the runs: an older file without the wall rows gets them
        data["table"] = [row for row in data["table"] if "wall" not in row[0]]
        out.write_text(json.dumps(data))
        summary.main(["--accuracy", str(tmp_path / "none.json"), "--speed", str(tmp_path / "none.json"),
                      "--prefix", str(out), "--out-dir", str(tmp_path)])
        md = (tmp_path / "summary.md").read_text()
        walls = [line for line in md.splitlines() if " wall s |" in line]
        assert [line.split(" |")[0] for line in walls] == ["| c=1 wall s", "| c=3 wall s", "| chats wall s"]
        assert all(float(line.split("|")[2]) > 0 for line in walls)

    def test_e2e_smoke_driver_compares_passes_from_an_empty_cache(fake, tmp_path):
        out = tmp_path / "e2e_smoke.json"
        res = e2e_smoke.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--prompts", "5",
                              "--max-tokens", "8", "--rabitq-args=--rabitq-center calibrate"])
        checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
        assert list(checks) == [c["check"] for c in res["checks"]]
        # the fake is deterministic: repeat runs and graph on/off agree; it answers some prompts differently
        # as rabitq, so the comparisons against dense see it
        for name in ("dense repeat run identical (reported)", "sparse repeat run identical", "nograph repeat run identical",
                     "CUDA graph on/off identical", "openai chat", "openai streaming"):
            assert checks[name]["passed"], checks[name]
        assert not checks["top-p 1.0 greedy text identical to dense"]["passed"]
        assert not checks["below the automatic batch-context threshold: greedy text identical to dense"]["passed"]
        # every greedy pass starts from an empty radix cache: one flush per pass, each server
        logs = tmp_path / "logs"
        flushes = {name: (logs / f"smoke-{name}.log").read_text().count("flush_cache")
                   for name in ("dense", "p1", "sparse", "nograph", "dense-nograph", "auto")}
        assert flushes == {"dense": 2, "p1": 1, "sparse": 2, "nograph": 2, "dense-nograph": 1, "auto": 1}
        # the dense and the default rabitq server each compile into a fresh Triton cache of their own
        caches = {name: next(line for line in (logs / f"smoke-{name}.log").read_text().splitlines()
                             if line.startswith("fake triton cache")).split()[-1] for name in flushes}
        assert caches["dense"] == str(logs / "triton-cache-dense") and caches["sparse"] == str(logs / "triton-cache-sparse")
        assert checks["new batch sizes compile no more Triton kernels than dense"] == {
            "check": "new batch sizes compile no more Triton kernels than dense", "passed": True, "rabitq": 0, "dense": 0}
        (tmp_path / "cache" / "a1").mkdir(parents=True)
        (tmp_path / "cache" / "b2").mkdir()
        (tmp_path / "cache" / "lock").write_text("")
        assert e2e_smoke.compiled_kernels(tmp_path / "cache") == 2 and e2e_smoke.compiled_kernels(tmp_path / "none") == 0
        for name in ("p1", "sparse", "nograph", "dense", "auto"):  # --rabitq-args reach the rabitq servers only
            argv = next(line for line in (logs / f"smoke-{name}.log").read_text().splitlines() if "fake sglang" in line)
            assert ("'--rabitq-center', 'calibrate'" in argv) == (name != "dense"), (name, argv)
            # the graph on/off pair shares a threshold that splits the prompts between the two paths
            switch = f"'--rabitq-min-batch-context', '{e2e_smoke.SWITCH_AT}'"
            assert (switch in argv) == (name in ("sparse", "nograph")), (name, argv)

    def test_profile_decode_driver(fake, tmp_path):
        out = tmp_path / "profile.json"
        res = profile_decode.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--context", "2048",
                                   "--batch", "2", "--gen", "400", "--steps", "4", "--settle", "0.05"])
        data = json.loads(out.read_text())
        dense, ours = data["runs"]["dense"], data["runs"]["rabitq"]
        assert dense["graph_launches_per_step"] == 1 and dense["kernel_launches_per_step"] == 0
        assert ours["graph_launches_per_step"] == 0 and ours["kernel_launches_per_step"] == 3
        assert ours["syncs_per_step"] == 1 and ours["sync_us_per_step"] == 40
        assert dense["kernels_per_step"] == 3 and dense["gpu_busy_us_per_step"] == 60
        assert dense["top_kernels"][0]["us_per_step"] == 20 and "attn_kernel" in [k["name"] for k in dense["top_kernels"]]
        assert not dense["errors"] and not ours["errors"] and res["runs"].keys() == {"dense", "rabitq"}
        assert not list((tmp_path / "traces").rglob("*.trace.json*"))  # summarized, then removed
        assert "graph launches/step" in out.with_suffix(".md").read_text()

    def test_bench_decode_driver_and_summary(fake, tmp_path):
        out = tmp_path / "speed.json"
        bench_decode.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--contexts", "2048,4096",
                           "--batches", "1,4", "--gen", "12", "--prefill-reps", "1", "--repeats", "1",
                           "--metrics-settle", "0.3"])
        data = json.loads(out.read_text())
        assert data["prompts"] == "random"  # the fake model folder has no tokenizer
        assert {(r["context"], r["batch"]) for r in data["rows"]} == {(c, b) for c in (1024, 2048, 4096) for b in (1, 4)}
        assert all(r["speedup"] > 0 and r["amdahl_limit"] is not None for r in data["rows"])
        assert all(r["budget"] == pytest.approx(0.2) for r in data["rows"])  # fake: 2 (1 - p), p = 0.9
        s = summary.main(["--accuracy", str(tmp_path / "none.json"), "--speed", str(out),
                          "--prefix", str(tmp_path / "none.json"), "--out-dir", str(tmp_path)])
        assert len(s["speed"]) == 6 and s["accuracy"] == []

    def test_gpu_suite_runs_the_speed_benchmark_at_the_accuracy_runs_operating_point(fake, tmp_path):
        import subprocess

        out = tmp_path / "suite"
        env = {**os.environ, "ACC_CONTEXTS": "1024", "ACC_SAMPLES": "1", "ACC_TOP_P": "0.8,0.9", "ACC_TEMPERATURE": "0.5",
               "SPEED_AT": "accuracy", "SPEED_PICK_CONTEXT": "1024", "SPEED_CONTEXTS": "2048", "SPEED_BATCHES": "1"}
        subprocess.run(["bash", str(ROOT / "eval" / "gpu_suite.sh"), str(fake), str(out), "accuracy", "speed"],
                       check=True, capture_output=True, timeout=600, env=env)
        assert (out / "progress").read_text().count("rc=0") == 2
        speed = json.loads((out / "speed.json").read_text())
        # every rabitq configuration of the fake misses the same answers: the cheapest, p 0.9 at t 0.5, is run
        assert speed["config"]["top_p"] == 0.9 and "--rabitq-score-temperature 0.5" in speed["config"]["rabitq_args"]
        assert all(r["budget"] == pytest.approx(0.4) for r in speed["rows"])  # the fake's 2 (1 - p) / t

    def test_quick_keeps_explicit_values():
        import argparse

        from eval.server import apply_quick

        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--samples", type=int, default=10)
        ap.add_argument("--contexts", default="4096,8192")
        args = ap.parse_args(["--quick", "--contexts", "2048"])
        apply_quick(ap, args, {"samples": 3, "contexts": "4096"})
        assert (args.samples, args.contexts) == (3, "2048")
        args = ap.parse_args(["--samples", "5"])
        apply_quick(ap, args, {"samples": 3})
        assert args.samples == 5

    def test_bench_decode_times_an_always_sparse_server_beside_the_configured_one(fake, tmp_path):
        out = tmp_path / "speed.json"
        bench_decode.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--contexts", "2048",
                           "--batches", "2", "--gen", "8", "--prefill-reps", "1", "--repeats", "1",
                           "--backends", "dense,rabitq,rabitq-sparse", "--metrics-settle", "0.3",
                           "--rabitq-args=--rabitq-min-batch-context 4096"])
        data = json.loads(out.read_text())
        assert all(r["always_sparse"]["speedup"] > 0 for r in data["rows"])
        # each rabitq server's logged config (the fake's, resolved for head dim 64) is kept beside its points
        assert [data["runs"][k]["rabitq_config"]["key_bits"] for k in ("rabitq", "rabitq-sparse")] == [3, 3]
        assert "rabitq_config" not in data["runs"]["dense"]
        logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("speed-*.log")}
        (sparse_log,) = [text for name, text in logs.items() if name.startswith("speed-2-")]
        # the run's own threshold first, then 0, which SGLang's parser takes (the last value wins)
        assert "'--rabitq-min-batch-context', '4096', '--rabitq-min-batch-context', '0'" in sparse_log
        (configured,) = [text for name, text in logs.items() if name.startswith("speed-1-")]
        assert "'--rabitq-min-batch-context', '0'" not in configured

    def test_bench_decode_skips_points_beyond_the_kv_pool(fake, tmp_path):
        out = tmp_path / "speed.json"
        bench_decode.main(["--model", str(fake), "--port", str(_port()), "--out", str(out), "--contexts", "16384",
                           "--batches", "4", "--gen", "4", "--prefill-reps", "1", "--repeats", "1", "--backends", "dense",
                           "--metrics-settle", "0.3"])
        data = json.loads(out.read_text())
        assert data["runs"]["dense"]["skipped"][0]["context"] == 16384  # 4 x 16K > 50K fake pool
        assert data["rows"] == []

    def test_rabitq_server_logs_are_named_by_top_p_and_score_temperature(tmp_path):
        """Two servers of one run at the same top-p but different score temperatures get different logs."""
        from eval import server as S

        ap = argparse.ArgumentParser()
        S.add_server_args(ap)
        args = ap.parse_args(["--model", "m", "--out", str(tmp_path / "acc.json"), "--rabitq-args=--rabitq-center none"])
        names = [S.server_for(args, "rabitq", i, 0.8, extra=extra).log_path.name
                 for i, extra in enumerate([["--rabitq-score-temperature", "0.8"], ["--rabitq-score-temperature", "1.0"], []])]
        assert names == ["acc-0-rabitq-p0.8-t0.8.log", "acc-1-rabitq-p0.8-t1.0.log", "acc-2-rabitq-p0.8.log"]
        assert S.server_for(args, "dense", 3).log_path.name == "acc-3-dense.log"

    def test_the_config_a_rabitq_server_ran_with_is_read_from_its_log():
        from eval import answer_fidelity as A
        from eval import server as S

        # a committed server log of the 0.5B served with --rabitq-key-bits 3 (its startup line)
        log = ROOT / "eval/results/logs-2026-12-07c-h100-qwen05-key-bits3/plogs"
        got = S.logged_rabitq_config(next(log.glob("*rabitq*.log")).read_text())
        assert (got["top_p"], got["score_temperature"], got["key_bits"], got["max_budget"]) == (0.9, 1.0, 3, 1.0)
        assert got["center"] == "calibrate" and got["min_batch_context"] == 0
        assert S.logged_rabitq_config("fake sglang\nmax_total_num_tokens=50000\n") is None  # a dense server
        # the served comparison takes what the server logged over what its flags and defaults imply
        assert A.served_setting({"top_p": 0.9, "rabitq_args": ""}, 128, got) == A.Setting(0.9, 1.0, 1.0, key_bits=3)


if __name__ == "__main__":
    serve()



def test_dummy_weights_give_logits_below_fp16_resolution(tmp_path):
    """Why the Llama dummy shape runs at a 100 % budget: SGLang's own dummy init ties every stored logit."""
    sys.path.insert(0, str(ROOT))
    from eval import dummy_logit_scale

    got = dummy_logit_scale.main(["--tokens", "64", "--out", str(tmp_path / "scale.json")])
    assert got["max_abs_logit"] <= got["max_norm_bound"] < got["fp16_smallest_subnormal"]
    assert got["distinct_fp16_logits_per_head_max"] == 1
    assert json.loads((tmp_path / "scale.json").read_text())["tokens"] == 64


def test_normal_weights_give_spread_logits(tmp_path):
    """The random checkpoint's scale gives unit-order logits, distinct in fp16: a budget can be set there."""
    sys.path.insert(0, str(ROOT))
    from eval import dummy_logit_scale

    got = dummy_logit_scale.main(["--init", "normal", "--tokens", "64", "--out", str(tmp_path / "scale.json")])
    assert 0.5 < got["logit_std_per_head_mean"] < 5
    assert got["distinct_fp16_logits_per_head_max"] > 32


def test_random_checkpoint_names_and_shapes_are_transformers_llama():
    """Every parameter of the Llama-3.1-8B shape, by HF name and shape (built on the meta device: no memory)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval.bench_decode import LLAMA_8B
    from eval.random_checkpoint import llama_shapes

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    shards = llama_shapes(LLAMA_8B)
    got = {n: s for group in shards["embed"] + shards["layers"] + shards["head"] for n, s in group.items()}
    assert got == want


def test_random_checkpoint_loads_in_transformers(tmp_path):
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForCausalLM

    from eval.bench_decode import LLAMA_8B
    from eval.random_checkpoint import write_random_checkpoint

    cfg = {**LLAMA_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
    folder = write_random_checkpoint(tmp_path / "m", cfg, seed=3, device="cpu")
    model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.input_layernorm.weight"], torch.ones(64, dtype=sd["model.norm.weight"].dtype))
    assert abs(sd["model.layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 0.002
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    # an existing complete checkpoint of the same config is kept; another config is written anew
    stamp = (folder / "model-00001-of-00004.safetensors").stat().st_mtime_ns
    write_random_checkpoint(folder, cfg, seed=3, device="cpu")
    assert (folder / "model-00001-of-00004.safetensors").stat().st_mtime_ns == stamp
    write_random_checkpoint(folder, {**cfg, "rms_norm_eps": 1e-6}, seed=3, device="cpu")
    assert json.loads((folder / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_cap_fidelity_measures_a_capped_subset_of_the_top_p_set(fresh_seed):
    """eval/cap_fidelity.py on random q and k: a cap keeps a subset (less true mass, a smaller budget)
    and about ceil(cap * scored) tokens plus the sink and window."""
    sys.path.insert(0, str(ROOT))
    import math

    import torch

    from eval.cap_fidelity import layer_samples

    q, k = torch.randn(400, 4, 64), torch.randn(400, 2, 64) + 0.3
    settings = [(0.9, 1.0, 1.0), (0.9, 1.0, 0.1)]
    got = layer_samples(q, k, [299, 399], settings, sink=16, window=16, calib=64, seed=fresh_seed, layer=3)
    free, capped = got[settings[0]], got[settings[1]]
    assert len(free["retained"]) == 2 * 4 and len(free["budget"]) == 2 * 2
    assert all(0.0 < r <= 1.0 + 1e-9 for r in free["retained"] + capped["retained"])
    assert all(c <= f + 1e-12 for c, f in zip(capped["retained"], free["retained"]))
    for length, budgets in ((300, capped["budget"][:2]), (400, capped["budget"][2:])):
        for b in budgets:
            assert b * length <= math.ceil(0.1 * (length - 32)) + 16 + 32
