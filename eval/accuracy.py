"""Long-context accuracy: RULER-style tasks, dense backend vs rabitq at several top-p, same model and GPU.

    python eval/accuracy.py --model /tmp/models/qwen05 --contexts 4096,8192,16384 --samples 10
    python eval/accuracy.py --model /tmp/models/qwen15 --contexts 32768 --top-p 0.8,0.9 --score-temperature 0.8,1
    python eval/accuracy.py --model /tmp/models/smollm2 --quick          # 2 servers, 4K, 3 samples per task

One server start per configuration (dense, then rabitq at each --top-p x --score-temperature; without
--score-temperature the server's default), greedy decoding through the OpenAI
client; ``--parallel N`` keeps N of them running at once (each on its own port, each started once the one
before it has sized its KV pool, which SGLang sizes from the memory free at startup: give them
``--mem-fraction-static`` that fit together). Per (task, context, backend, top_p): score 0-100 and the
decode budget (attended / context tokens from the rabitq Prometheus counters over that group). Writes
eval/results/accuracy.json after every server (``eval/operating_point.py`` picks from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402
from eval import tasks as T  # noqa: E402

RESERVE = 192  # tokens kept free for the chat template and the answer when a context meets the model window


def model_max_context(model: str) -> int | None:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("max_position_embeddings")


def run_config(args, samples, kind, top_p, temp, index, up: threading.Event | None = None) -> tuple[list, list, dict]:
    """Scores of one configuration (``temp``: score temperature, None for the server's default); ``up``
    is set once its server has sized its KV pool (or failed)."""
    rows, outputs = [], []
    try:
        extra = ["--rabitq-score-temperature", str(temp)] if temp is not None else []
        srv = S.server_for(args, kind, index, top_p, extra=extra)
        srv.launch()
        srv.wait_for_log()
    finally:
        if up is not None:
            up.set()
    try:
        srv.wait_ready()
        client = srv.openai()
        S.warmup_chat(client, args.warmup_prompts)
        start = before = srv.snapshot()
        groups = {}
        for s in samples:
            groups.setdefault((s.task, s.context), []).append(s)
        for (task, ctx), group in S.progress(list(groups.items()), desc=config_name(kind, top_p, temp)):
            res = S.run_concurrent(lambda s: S.chat_once(client, s.messages, s.max_tokens), group, args.concurrency)
            after = srv.snapshot()
            delta, before = S.metrics_delta(before, after), after
            scores = []
            for s, r in zip(group, res):
                sc = T.score(s, r.get("text", "")) if "error" not in r else 0.0
                scores.append(sc)
                outputs.append({"task": task, "context": ctx, "index": s.index, "backend": kind, "top_p": top_p,
                                "score_temperature": temp, "answers": s.answers, "output": r.get("text"), "error": r.get("error"),
                                "prompt_tokens": r.get("prompt_tokens"), "score": sc})
            rows.append({"task": task, "context": ctx, "backend": kind, "top_p": top_p, "score_temperature": temp,
                         "score": sum(scores) / len(scores), "budget": delta["budget"] if kind == "rabitq" else None,
                         "n": len(group), "errors": sum("error" in r for r in res),
                         "prompt_tokens": S.mean_known([r.get("prompt_tokens") for r in res])})
        total = S.metrics_delta(start, before)
        total["startup_s"] = srv.startup_s
    finally:
        srv.stop()
    return rows, outputs, total


def config_name(kind, top_p, temp) -> str:
    if kind == "dense":
        return "dense"
    return f"p={top_p}" + (f" t={temp}" if temp is not None else "")


def config_key(r: dict) -> tuple:
    """A result row's configuration: (backend, top_p, score_temperature); rows written before the
    temperature was recorded ran at the server's default (None)."""
    return r["backend"], r["top_p"], r.get("score_temperature")


def mean_score_budget(rows: list[dict]) -> tuple[float, float | None]:
    """Mean score of result rows and mean budget of those that have one (None if none has)."""
    budgets = [r["budget"] for r in rows if r.get("budget") is not None]
    return sum(r["score"] for r in rows) / len(rows), (sum(budgets) / len(budgets) if budgets else None)


def config_order(c: tuple):
    """Dense first, then by temperature (the default first), then by top-p."""
    return c[0] != "dense", c[2] or 0, c[1] or 0


def print_table(rows) -> None:
    cols = sorted({config_key(r) for r in rows}, key=config_order)
    head = ["task", "ctx"] + [config_name(*c) for c in cols]
    print("\n" + " | ".join(f"{h:>17}" for h in head))
    keys = sorted({(r["task"], r["context"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for task, ctx in keys:
        cells = []
        for c in cols:
            r = next((r for r in rows if (r["task"], r["context"]) == (task, ctx) and config_key(r) == c), None)
            budget = f" ({100 * r['budget']:.0f}%)" if r and r["budget"] is not None else ""
            cells.append(f"{r['score']:.1f}{budget}" if r else "-")
        print(" | ".join(f"{c:>17}" for c in [task, str(ctx)] + cells))
    print("score 0-100 (budget: attended / context tokens)\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S.add_server_args(ap)
    ap.add_argument("--tasks", type=S.csv_list(), default=list(T.TASKS))
    ap.add_argument("--contexts", type=S.csv_list(int), default=[4096, 8192])
    ap.add_argument("--samples", type=int, default=10, help="samples per task and context")
    ap.add_argument("--top-p", type=S.csv_list(float), default=[0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--score-temperature", type=S.csv_list(float), default=[],
                    help="rabitq score temperatures, each run at every --top-p (default: the server's)")
    ap.add_argument("--backends", type=S.csv_list(), default=["dense", "rabitq"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=1, help="configurations (servers) running at once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    S.apply_quick(ap, args, {"contexts": [4096], "samples": 3, "top_p": [0.9]})
    args.out = args.out or str(S.RESULTS / "accuracy.json")
    for t in args.tasks:
        if t not in T.TASKS:
            ap.error(f"unknown task {t}; choose from {T.TASKS}")

    tokenizer = T.load_tokenizer(args.model)
    counter = T.TokenCounter(tokenizer)
    max_ctx = args.context_length or model_max_context(args.model)
    print(f"[accuracy] generating samples (tokenizer: {'model' if tokenizer else '4 chars/token'}, "
          f"model window {max_ctx})", flush=True)
    samples = T.make_samples(args.tasks, args.contexts, args.samples, args.seed, counter, RESERVE, max_ctx)
    size = min(args.contexts) if not max_ctx else min(min(args.contexts), max_ctx - RESERVE)
    args.warmup_prompts = [T.make_sample("niah_single", size, args.seed + 1000, i, counter).messages for i in range(4)]
    if args.context_length is None and max_ctx:
        args.context_length = min(max_ctx, max(args.contexts) + RESERVE)

    temps = args.score_temperature or [None]
    configs = ([("dense", None, None)] if "dense" in args.backends else []) + \
              ([("rabitq", p, t) for t in temps for p in args.top_p] if "rabitq" in args.backends else [])
    result = {**S.env_info(args.model), "config": {k: v for k, v in vars(args).items() if k != "warmup_prompts"},
              "rows": [], "runs": [], "outputs": []}
    lock = threading.Lock()

    def run(i, kind, p, t, up):
        try:
            rows, outputs, total = run_config(args, samples, kind, p, t, i, up)
        except Exception as e:  # noqa: BLE001 - keep the other configurations
            print(f"[accuracy] {config_name(kind, p, t)} failed: {e}", flush=True)
            rows, outputs, total = [], [], {"error": str(e)}
        with lock:
            result["rows"] += rows
            result["outputs"] += outputs
            result["runs"].append({"backend": kind, "top_p": p, "score_temperature": t, **total})
            S.write_json(args.out, result)
            print_table(result["rows"])

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for i, (kind, p, t) in enumerate(configs):
            up = threading.Event()
            pool.submit(run, i, kind, p, t, up)
            up.wait()  # the next server starts once this one has sized its KV pool (or a slot is free)
    S.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
