"""Where a decode step's time goes, dense vs rabitq, from SGLang's own profiler (torch.profiler traces).

    python eval/profile_decode.py --dummy llama8b --context 32768 --batch 1 --out eval/results/profile-llama8b.json

Per backend one server; ``--batch`` requests of ``--context`` random tokens decode; once every request is
decoding, POST /start_profile records ``--steps`` forward steps (CPU and GPU activities) and SGLang writes a
trace. Each trace is summarized per decode step: wall time, GPU busy time (union of kernel intervals), host
launches (CUDA-graph launches vs single kernel launches: a step replayed from a graph launches one graph),
host syncs, and the GPU kernels that take the most time. Writes the json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402
from eval.bench_decode import add_model_args, resolve_model, speed_server  # noqa: E402

GRAPH_LAUNCH = {"cudaGraphLaunch", "cuGraphLaunch"}
KERNEL_LAUNCH = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
SYNC = re.compile(r"^cu(da)?(Stream|Event|Device|Ctx)Synchronize")
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_trace(path: str | Path) -> list[dict]:
    """The complete ('X') events of a chrome trace (.json or .json.gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def kernel_name(name: str) -> str:
    """A short, stable name: templates, argument lists and launch suffixes dropped."""
    base = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    return (base.split()[-1] if base else name)[:80]


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def sync_sources(syncs: list[dict], cpu_ops: list[dict]) -> dict[str, int]:
    """Host syncs counted by the innermost CPU op (same thread) that encloses each: which op waited."""
    by_tid = collections.defaultdict(list)
    for op in cpu_ops:
        by_tid[op.get("tid")].append(op)
    counts = collections.Counter()
    for s in syncs:
        inside = [op for op in by_tid.get(s.get("tid"), [])
                  if op["ts"] <= s["ts"] and s["ts"] + s["dur"] <= op["ts"] + op["dur"]]
        counts[min(inside, key=lambda op: op["dur"])["name"] if inside else "(no enclosing op)"] += 1
    return dict(counts.most_common())


def summarize(events: list[dict], steps: int, top: int = 12) -> dict:
    """Per-step figures of a trace of ``steps`` forward steps (times in microseconds)."""
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    api = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    if not gpu:
        return {"steps": steps, "error": "no GPU activity in the trace"}
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    for e in gpu:
        k = by_kernel[kernel_name(e["name"])]
        k[0] += e["dur"]
        k[1] += 1
    kernel_us = sum(e["dur"] for e in gpu)
    busy = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    syncs = [e for e in api if SYNC.match(e["name"])]
    n = max(steps, 1)
    return {
        "steps": steps,
        "wall_us_per_step": (end - start) / n,
        "gpu_busy_us_per_step": busy / n,
        "gpu_busy_fraction": busy / (end - start) if end > start else None,
        "kernel_us_per_step": kernel_us / n,
        "kernels_per_step": len(gpu) / n,
        "graph_launches_per_step": sum(e["name"] in GRAPH_LAUNCH for e in api) / n,
        "kernel_launches_per_step": sum(e["name"] in KERNEL_LAUNCH for e in api) / n,
        "host_launch_us_per_step": sum(e["dur"] for e in api if e["name"] in KERNEL_LAUNCH | GRAPH_LAUNCH) / n,
        "syncs_per_step": len(syncs) / n,
        "sync_us_per_step": sum(e["dur"] for e in syncs) / n,
        "syncs_by_op": sync_sources(syncs, [e for e in events if e.get("cat") in ("cpu_op", "python_function")]),
        "top_kernels": [{"name": name, "us_per_step": t / n, "calls_per_step": c / n}
                        for name, (t, c) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def wait_for_trace(folder: Path, timeout: float) -> Path:
    """The trace SGLang writes once the profiled steps are done (its size stable for a second)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        found = sorted(folder.glob("*.trace.json*"))
        if found:
            size = found[-1].stat().st_size
            if last == size and size > 0:
                return found[-1]
            last = size
        time.sleep(1.0)
    raise TimeoutError(f"no trace in {folder} after {timeout:.0f} s")


def profile_backend(args, kind: str, index: int, prompts, ctx_len: int) -> dict:
    srv = speed_server(args, kind, index, ctx_len)
    trace_dir = Path(args.out).parent / "traces" / f"{Path(args.out).stem}-{kind}"
    trace_dir.mkdir(parents=True, exist_ok=True)
    for old in trace_dir.glob("*.trace.json*"):
        old.unlink()
    results, first_tokens = [], threading.Semaphore(0)

    def one(i: int) -> None:
        payload = {"input_ids": prompts(args.context, f"profile-{i}"),
                   "sampling_params": {"max_new_tokens": args.gen, "ignore_eos": True, "temperature": 0.0}}
        try:
            results.append(S.generate_stream(srv.url, payload, on_first_token=first_tokens.release))
        except Exception as e:  # noqa: BLE001
            results.append({"error": repr(e)})
            first_tokens.release()

    with srv:
        S.generate_stream(srv.url, {"input_ids": prompts(256, "warm"),  # compiles, not recorded
                                    "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.batch)]
        for t in threads:
            t.start()
        for _ in threads:
            first_tokens.acquire()
        time.sleep(args.settle)  # a few decode steps of the full batch first
        code, body = S.http_post(srv.url + "/start_profile", {
            "output_dir": str(trace_dir.resolve()), "num_steps": args.steps, "activities": ["CPU", "GPU"],
            "with_stack": False, "record_shapes": False})
        if code != 200:
            raise RuntimeError(f"/start_profile answered {code}: {body[:300]}")
        trace = wait_for_trace(trace_dir, args.trace_timeout)
        for t in threads:
            t.join()
    errors = [r["error"] for r in results if "error" in r]
    out = {"backend": kind, "trace": str(trace), "errors": errors, "startup_s": srv.startup_s,
           **summarize(load_trace(trace), args.steps, args.top)}
    if not args.keep_traces:
        trace.unlink()
    return out


def markdown(result: dict) -> str:
    runs = result["runs"]
    cols = [("wall_us_per_step", "wall us/step"), ("gpu_busy_us_per_step", "GPU busy us/step"),
            ("gpu_busy_fraction", "GPU busy"), ("kernels_per_step", "kernels/step"),
            ("graph_launches_per_step", "graph launches/step"), ("kernel_launches_per_step", "kernel launches/step"),
            ("host_launch_us_per_step", "host launch us/step"), ("syncs_per_step", "syncs/step"),
            ("sync_us_per_step", "sync us/step")]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Decode step profile: {result['model_name']}, context {result['config']['context']}, "
             f"batch {result['config']['batch']}", "",
             f"{result['gpu']}, sglang {result['sglang']}, {result['date']}. Command: `{result['command']}`", "",
             "| backend | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind, r in runs.items():
        lines.append(f"| {kind} | " + " | ".join(fmt(r.get(c[0])) for c in cols) + " |")
    for kind, r in runs.items():
        if r.get("syncs_by_op"):
            lines += ["", f"{kind}: host syncs by enclosing CPU op (all steps): "
                      + ", ".join(f"`{op}` {c}" for op, c in r["syncs_by_op"].items())]
    for kind, r in runs.items():
        lines += ["", f"## {kind}: top GPU kernels per step", "", "| kernel | us/step | calls/step |", "|---|---|---|"]
        lines += [f"| `{k['name']}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.1f} |" for k in r.get("top_kernels", [])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S.add_server_args(ap, port=28000, model_required=False)
    add_model_args(ap)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gen", type=int, default=256, help="new tokens per request (outlasts the profiled steps)")
    ap.add_argument("--steps", type=int, default=20, help="forward steps recorded")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of decoding before the profile starts")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per backend")
    ap.add_argument("--backends", type=S.csv_list(), default=["dense", "rabitq"])
    ap.add_argument("--trace-timeout", type=float, default=300.0)
    ap.add_argument("--keep-traces", action="store_true")
    args = ap.parse_args(argv)
    name, prompts = resolve_model(ap, args)
    args.out = args.out or str(S.RESULTS / "profile.json")
    ctx_len = args.context_length or args.context + args.gen + 64
    result = {**S.env_info(args.model), "model_name": name, "config": vars(args), "runs": {}}
    S.run_backends(args, result, lambda kind, i: profile_backend(args, kind, i, prompts, ctx_len), "profile_decode")
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
