"""Shared helpers of the end-to-end evaluation: start/stop SGLang servers, read /metrics, stream requests.

    with Server(model, "rabitq", port=30000, extra_args=["--rabitq-top-p", "0.9"]) as srv:
        before = rabitq_snapshot(srv.url)
        ...                                  # send requests to srv.url (OpenAI client: srv.openai())
        delta = metrics_delta(before, rabitq_snapshot(srv.url))   # budget, cache hit rate, codes reused...

Only the standard library is needed here (urllib for HTTP); openai and tqdm are imported lazily.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "eval" / "results"


# ----------------------------------------------------------------------------------------------- server


class Server:
    """``python -m sglang.launch_server`` in its own process group; ready once GET /health_generate is 200.

    The whole group (tokenizer, scheduler, detokenizer processes) is killed on exit, also on exceptions,
    Ctrl-C and SIGTERM of this script, and we wait for it to be gone so the GPU memory is free again.
    """

    def __init__(
        self,
        model: str,
        backend: str,
        port: int = 30000,
        extra_args: list[str] | tuple[str, ...] = (),
        mem_fraction_static: float | None = None,
        context_length: int | None = None,
        enable_metrics: bool = True,
        log_path: str | Path | None = None,
        timeout: float = 600.0,
        host: str = "127.0.0.1",
        env: dict | None = None,
    ):
        self.model, self.backend, self.port, self.host = model, backend, port, host
        self.timeout = timeout
        self.log_path = Path(log_path) if log_path else RESULTS / "logs" / f"server-{backend}-{port}.log"
        self.env = env
        # EVAL_SGLANG_LAUNCHER (a script path) replaces `-m sglang.launch_server`: the CPU tests use a fake server
        launcher = os.environ.get("EVAL_SGLANG_LAUNCHER")
        cmd = [sys.executable] + ([launcher] if launcher else ["-m", "sglang.launch_server"])
        cmd += ["--model-path", model, "--attention-backend", backend, "--host", host, "--port", str(port)]
        if mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(mem_fraction_static)]
        if context_length is not None:
            cmd += ["--context-length", str(context_length)]
        if enable_metrics:
            cmd += ["--enable-metrics", "--enable-cache-report"]
        self.cmd = cmd + [str(a) for a in extra_args]
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.metrics_settle = 0.0  # see snapshot()
        self._old_sigterm = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process and return at once (``wait_ready`` / ``wait_for_log`` wait for it)."""
        self._take_free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write("$ " + shlex.join(self.cmd) + "\n")
        self._log.flush()
        if threading.current_thread() is threading.main_thread():
            # turn SIGTERM (e.g. `timeout`) into SystemExit so __exit__ still kills the server
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        env = {**os.environ, **(self.env or {})}
        print(f"[server] starting {self.backend} on :{self.port} (log {self.log_path})", flush=True)
        self._t0 = time.time()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def _take_free_port(self, tries: int = 10) -> None:
        """Move to the next free port if ours is taken (another listener, or a client connection's local port):
        otherwise the server dies at bind time, after loading the model."""
        for port in range(self.port, self.port + tries):
            if port_is_free(self.host, port):
                break
        else:
            raise RuntimeError(f"ports {self.port}-{self.port + tries - 1} on {self.host} are all in use; "
                               "pass another --port")
        if port != self.port:
            print(f"[server] port {self.port} is in use; {self.backend} takes {port}", flush=True)
            self.cmd[self.cmd.index("--port") + 1] = str(port)
            self.port = port

    def _wait(self, ready) -> None:
        """Poll ``ready()`` until true; raise (and stop the server) if it exits or times out."""
        try:
            wait = 0.2
            while not ready():
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with code {self.proc.returncode} during startup; log tail:\n"
                        + tail(self.log_path)
                    )
                if time.time() - self._t0 > self.timeout:
                    raise TimeoutError(f"server not ready after {self.timeout:.0f} s; log tail:\n" + tail(self.log_path))
                time.sleep(wait)
                wait = min(2.0, wait * 1.5)
        except BaseException:
            self.stop()
            raise

    def wait_for_log(self, text: str = "max_total_num_tokens=") -> None:
        """Wait until the log shows ``text``; by default: the KV pool is sized, so the next server
        on this GPU can profile its free memory without racing this one."""
        self._wait(lambda: text in self.log_path.read_text(errors="replace"))

    def wait_ready(self) -> None:
        def healthy():
            try:
                return http_get(self.url + "/health_generate", timeout=10)[0] == 200
            except OSError:
                return False

        self._wait(healthy)
        self.startup_s = time.time() - self._t0
        print(f"[server] {self.backend} ready after {self.startup_s:.0f} s", flush=True)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
            print(f"[server] {self.backend} on :{self.port} stopped", flush=True)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def openai(self, timeout: float = 600.0):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", timeout=timeout, max_retries=0)

    def info(self) -> dict:
        """GET /server_info (server args, max_total_num_tokens, version, ...); {} when unavailable."""
        try:
            return json.loads(http_get(self.url + "/server_info", timeout=30)[1])
        except (OSError, ValueError):
            return {}

    def rabitq_config(self) -> dict | None:
        """The settings this rabitq server runs with, unset flags resolved for its model (its startup log
        line, ``logged_rabitq_config``); None for another backend."""
        return logged_rabitq_config(self.log_path.read_text(errors="replace")) if self.log_path.exists() else None

    def snapshot(self) -> dict:
        """rabitq_snapshot after the counters have caught up. The rabitq backend exports its device counters
        at most every SGLANG_RABITQ_LOG_EVERY_S seconds, at its next batch: wait that long, then run a
        one-token batch (GET /health_generate) so the export happens, then scrape."""
        if self.metrics_settle > 0:
            time.sleep(self.metrics_settle)
            try:
                http_get(self.url + "/health_generate", timeout=60)
            except OSError:
                pass
        return rabitq_snapshot(self.url)

    def flush_cache(self) -> bool:
        try:
            return http_post(self.url + "/flush_cache", {}, timeout=60)[0] == 200
        except OSError:
            return False


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now (SO_REUSEADDR, as servers set it: TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        t0 = time.time()
        while time.time() - t0 < wait:
            proc.poll()
            try:
                os.killpg(pgid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.5)
    proc.poll()


def tail(path: Path, n: int = 40) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------- http


def http_get(url: str, timeout: float = 30.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def http_post(url: str, payload: dict, timeout: float = 600.0) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def generate_stream(url: str, payload: dict, timeout: float = 1800.0, on_first_token=None) -> dict:
    """POST /generate with stream=True; returns the final meta_info/output plus client-side token timings.

    ``chunk_times``/``chunk_tokens``: arrival time (perf_counter) of each chunk and how many output tokens it
    carried, so decode speed can be measured in any time window. ``on_first_token()`` is called once the
    first output token arrives (the request is decoding from then on).
    """
    payload = {**payload, "stream": True}
    req = urllib.request.Request(
        url + "/generate", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    times, counts, last, n_prev = [], [], None, 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            now = time.perf_counter()
            n = int(obj.get("meta_info", {}).get("completion_tokens", n_prev + 1))
            if n > n_prev:
                if not times and on_first_token is not None:
                    on_first_token()
                times.append(now)
                counts.append(n - n_prev)
                n_prev = n
            last = obj
    if last is None:
        raise RuntimeError("empty stream from /generate")
    return {"start": t0, "chunk_times": times, "chunk_tokens": counts, "meta_info": last.get("meta_info", {}),
            "output_ids": last.get("output_ids"), "text": last.get("text")}


def chat_stream(client, messages: list[dict], max_tokens: int, model: str = "default", **extra) -> dict:
    """One greedy streaming chat completion: text, TTFT, per-token timings, usage (cached prompt tokens)."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, **extra,
    )
    pieces, times, usage = [], [], None
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta.content
            if delta:
                pieces.append(delta)
                times.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    out = {"text": "".join(pieces), "start": t0, "chunk_times": times, "e2e_s": time.perf_counter() - t0}
    out["ttft_s"] = times[0] - t0 if times else None
    out["completion_tokens"] = getattr(usage, "completion_tokens", None) if usage else None
    out["prompt_tokens"] = getattr(usage, "prompt_tokens", None) if usage else None
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    out["cached_tokens"] = (getattr(details, "cached_tokens", 0) or 0) if details is not None else (0 if usage else None)
    n = out["completion_tokens"] or len(times)
    out["decode_s"] = times[-1] - times[0] if len(times) >= 2 else None
    out["tpot_s"] = out["decode_s"] / (n - 1) if out["decode_s"] is not None and n > 1 else None
    return out


def chat_once(client, messages: list[dict], max_tokens: int, model: str = "default") -> dict:
    """Non-streaming greedy chat completion: text and usage."""
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0)
    u = r.usage
    return {"text": r.choices[0].message.content or "", "e2e_s": time.perf_counter() - t0,
            "prompt_tokens": getattr(u, "prompt_tokens", None), "completion_tokens": getattr(u, "completion_tokens", None)}


def warmup_chat(client, prompts: list[list[dict]], max_tokens: int = 8) -> None:
    """Compile what the first long requests would otherwise compile inside the measurement: one long prompt
    cold, the same again (the cached-prefix path), then the others concurrently (batched prefill/decode)."""
    chat_once(client, prompts[0], max_tokens)
    chat_once(client, prompts[0], max_tokens)
    run_concurrent(lambda m: chat_once(client, m, max_tokens), prompts[1:], max(1, len(prompts) - 1), desc="warm-up")


# ---------------------------------------------------------------------------------------------- metrics

# what the rabitq backend exports (counters; prometheus_client may add _total/_created and labels)
RABITQ_METRICS = {
    "attended": "sglang_rabitq_attended_tokens",
    "context": "sglang_rabitq_context_tokens",
    "codes_reused": "sglang_rabitq_codes_reused",
    "codes_encoded": "sglang_rabitq_codes_encoded",
    "encode_s": "sglang_rabitq_encode_seconds",
}
# SGLang's own counters (0.5.17, sglang/srt/observability/metrics_collector.py)
SGLANG_METRICS = {
    "prompt_tokens": "sglang:prompt_tokens",
    "cached_tokens": "sglang:cached_tokens",
    "generation_tokens": "sglang:generation_tokens",
}
DEFAULT_SERVER_ARGS = "--disable-prefill-cuda-graph"
METRICS_EVERY_S = 1.0  # SGLANG_RABITQ_LOG_EVERY_S we give rabitq servers (0 would sync the GPU every batch)
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value summed over all label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def find_metric(metrics: dict[str, float], name: str) -> float | None:
    """Value of counter ``name`` matched by prefix: exact, then NAME_total, then any NAME* sample that is not
    a _created/_bucket/_count timestamp or histogram part (summed); None when absent. ':' and '_' match."""
    norm = {k.replace(":", "_"): v for k, v in metrics.items()}
    stem = name.replace(":", "_")
    stem = stem[: -len("_total")] if stem.endswith("_total") else stem
    for key in (stem + "_total", stem):
        if key in norm:
            return norm[key]
    hits = [v for k, v in norm.items() if k.startswith(stem) and not k.endswith(("_created", "_bucket", "_count"))]
    return sum(hits) if hits else None


def scrape(url: str, timeout: float = 30.0) -> dict[str, float]:
    try:
        status, body = http_get(url + "/metrics", timeout=timeout)
    except OSError:
        return {}
    return parse_prometheus(body) if status == 200 else {}


# the backend's startup line: "rabitq: RaBitQConfig(top_p=0.9, ..., key_bits=3, seed=0); ..."
_CONFIG_LINE = re.compile(r"rabitq: RaBitQConfig\((.*?)\);")
_CONFIG_FIELD = re.compile(r"(\w+)=('[^']*'|[^,]+)")


def logged_rabitq_config(log: str) -> dict | None:
    """The first ``RaBitQConfig`` a rabitq server logged (its fields as values), or None. The backend logs
    it after resolving the flags not given for the model's head dim, so a result file records the key
    bits, top-p and temperature that actually ran."""
    m = _CONFIG_LINE.search(log)
    if not m:
        return None
    return {k: ast.literal_eval(v) for k, v in _CONFIG_FIELD.findall(m.group(1))}


def snapshot_from(metrics: dict[str, float]) -> dict[str, float | None]:
    names = {**RABITQ_METRICS, **SGLANG_METRICS}
    return {key: find_metric(metrics, name) for key, name in names.items()}


def rabitq_snapshot(url: str) -> dict[str, float | None]:
    """Current values of the counters we track (None for those the server does not export)."""
    return snapshot_from(scrape(url))


def metrics_delta(before: dict, after: dict) -> dict:
    """Counter deltas over a run plus derived ratios: budget = attended/context, cache_hit_rate = cached/prompt."""
    d = {}
    for k in after:
        a, b = after.get(k), before.get(k)
        d[k] = None if a is None else a - (b or 0.0)
    d["budget"] = _ratio(d.get("attended"), d.get("context"))
    d["cache_hit_rate"] = _ratio(d.get("cached_tokens"), d.get("prompt_tokens"))
    if d.get("cache_hit_rate") is None and d.get("prompt_tokens"):
        d["cache_hit_rate"] = 0.0  # SGLang only adds the cached counter once something was cached
    for k in ("codes_reused", "codes_encoded"):
        if d.get(k) is not None:
            d[k] = int(round(d[k]))
    return d


def _ratio(a, b):
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------------- run utilities


def progress(iterable=None, **kw):
    """tqdm when installed, else the bare iterable (with a no-op update/close for manual bars)."""
    try:
        from tqdm import tqdm

        return tqdm(iterable, dynamic_ncols=True, **kw)
    except ImportError:
        return _NoBar(iterable)


class _NoBar:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def update(self, n=1):
        pass

    def close(self):
        pass


def run_concurrent(fn, items: list, concurrency: int, desc: str = "") -> list:
    """fn(item) for every item with at most ``concurrency`` in flight; results in input order. An exception
    in one request is recorded as {"error": str} rather than aborting the run."""
    results = [None] * len(items)
    bar = progress(total=len(items), desc=desc, leave=False)

    def one(i):
        try:
            results[i] = fn(items[i])
        except Exception as e:  # noqa: BLE001 - report, keep going
            results[i] = {"error": f"{type(e).__name__}: {e}"}
        bar.update(1)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(one, range(len(items))))
    bar.close()
    return results


def env_info(model: str | None = None) -> dict:
    """gpu name, sglang version, model, date and the exact command line."""
    return {"gpu": gpu_name(), "sglang": package_version("sglang"), "model": model,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable] + sys.argv)}


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    print(f"[eval] wrote {path}", flush=True)
    return path


def run_backends(args, result: dict, run, tag: str) -> None:
    """``result["runs"][kind] = run(kind, index)`` for each of ``args.backends``, one after another. A
    backend that fails is recorded as ``{"error": ...}`` and the next still runs (what the other one
    measured is kept); ``args.out`` is rewritten after each."""
    for i, kind in enumerate(args.backends):
        try:
            result["runs"][kind] = run(kind, i)
        except Exception as e:  # noqa: BLE001
            print(f"[{tag}] {kind} failed: {e}", flush=True)
            result["runs"][kind] = {"error": str(e)}
        write_json(args.out, result)


def csv_list(kind=str):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def mean_known(xs):
    """Mean of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def add_server_args(ap: argparse.ArgumentParser, port: int = 30000, model_required: bool = True) -> None:
    """Options every driver shares: model, ports, backends, memory, logs, output. The drivers' default ports
    sit below Linux's ephemeral range (32768 up), which client connections take their local ports from."""
    ap.add_argument("--model", required=model_required, help="model folder (HF config + weights [+ tokenizer])")
    ap.add_argument("--port", type=int, default=port,
                    help="first port; the i-th server start of a run takes port + 10 i (or the next free one above it)")
    ap.add_argument("--dense-backend", default="flashinfer", help="baseline attention backend")
    ap.add_argument("--ours-backend", default="rabitq", help="sparse attention backend under test")
    ap.add_argument("--mem-fraction-static", type=float, default=0.8)
    ap.add_argument("--context-length", type=int, default=None, help="server --context-length (default: auto)")
    ap.add_argument("--server-args", default=DEFAULT_SERVER_ARGS,
                    help='extra launch_server arguments for every server; write --server-args="--flag value". '
                         f'Default "{DEFAULT_SERVER_ARGS}": SGLang 0.5.17 otherwise captures ~58 prefill CUDA graphs '
                         'at startup (~230 s on a cold H100); decode CUDA graphs stay on. --server-args="" restores it.')
    ap.add_argument("--rabitq-args", default="",
                    help='extra launch_server arguments for the rabitq servers only: --rabitq-args="--rabitq-sink 128"')
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--log-dir", default=None, help="server logs (default: next to --out)")
    ap.add_argument("--out", default=None, help="result json path")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    ap.add_argument("--metrics-settle", type=float, default=METRICS_EVERY_S + 0.2,
                    help="seconds to wait before reading the rabitq counters (they are exported every "
                         f"SGLANG_RABITQ_LOG_EVERY_S, default {METRICS_EVERY_S} s here)")


def apply_quick(ap: argparse.ArgumentParser, args, quick: dict) -> None:
    """--quick: the given sizes, except where the command line set a value of its own."""
    if args.quick:
        for k, v in quick.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)


def flag_value(args: str | list[str], flag: str) -> str | None:
    """The value of ``flag`` in a command line, a string or its words (``--flag V`` or ``--flag=V``;
    the last one given, as argparse takes it)."""
    value, words = None, shlex.split(args) if isinstance(args, str) else args
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            value = words[i + 1]
        elif w.startswith(flag + "="):
            value = w.split("=", 1)[1]
    return value


def server_for(args, backend_kind: str, index: int, top_p: float | None = None, context_length=None,
               extra: list[str] | None = None, env: dict | None = None) -> Server:
    """The index-th server of a driver run: ``backend_kind`` is "dense" or "rabitq"."""
    backend = args.dense_backend if backend_kind == "dense" else args.ours_backend
    extra_args = shlex.split(args.server_args) + list(extra or [])
    if backend_kind == "rabitq":
        if top_p is not None and "rabitq" in backend:  # (another backend as stand-in: no rabitq flags)
            extra_args += ["--rabitq-top-p", str(top_p)]
        extra_args += shlex.split(args.rabitq_args)
    log_dir = Path(args.log_dir) if args.log_dir else Path(args.out).parent / "logs"
    tag = backend_kind + (f"-p{top_p}" if top_p is not None else "")
    temp = flag_value(extra_args, "--rabitq-score-temperature") if backend_kind == "rabitq" else None
    tag += f"-t{temp}" if temp is not None else ""
    env = dict(env or {})
    if backend_kind == "rabitq":  # counters exported every second (not every 10 s); snapshot() waits for them
        env["SGLANG_RABITQ_LOG_EVERY_S"] = os.environ.get("SGLANG_RABITQ_LOG_EVERY_S", str(METRICS_EVERY_S))
    srv = Server(args.model, backend, port=args.port + 10 * index, extra_args=extra_args,
                 mem_fraction_static=args.mem_fraction_static, context_length=context_length or args.context_length,
                 log_path=log_dir / f"{Path(args.out).stem}-{index}-{tag}.log", timeout=args.startup_timeout, env=env)
    if backend_kind == "rabitq":
        srv.metrics_settle = getattr(args, "metrics_settle", 0.0)
    return srv


def ensure_root_on_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
