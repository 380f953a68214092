"""Decode speed, dense vs rabitq: TPOT and decode tokens/s for given contexts and batch sizes.

    python eval/bench_decode.py --model /tmp/models/qwen05 --contexts 8192,16384,32768 --batches 1,8,32
    python eval/bench_decode.py --dummy llama8b --contexts 32768,65536 --batches 1,8   # Llama-3.1-8B shape
    python eval/bench_decode.py --dummy llama8b --dummy-weights normal --rabitq-args="--rabitq-max-budget 0.1" ...
    python eval/bench_decode.py --model /tmp/models/smollm2 --quick

For each backend one server; for each batch b and context (plus the --ref-context reference, 1K): b concurrent
/generate requests of exactly ``context`` tokens of English filler text (``--prompts random``, or a model
without a tokenizer: random ids), ``--gen`` new tokens with ignore_eos, streamed.
Decode speed is taken in the window where all b requests are decoding (after the last first token, before
the first finish). Also: single-request prefill time per context (rabitq - dense = encode overhead).
Amdahl reference: speedup(ctx) = rabitq_tok_s / dense_tok_s next to limit(ctx) = dense_tpot(ctx)/dense_tpot(1K),
the speedup if attention over ctx tokens cost what it costs at 1K. Writes eval/results/speed.json.
Random weights (--dummy) measure speed only. SGLang's dummy weights (uniform in +-1e-3, the default) make every
estimated logit round to the same fp16 value, and a threshold keeps tied tokens together, so rabitq attends every
token whatever its top-p or --rabitq-max-budget. ``--dummy-weights normal`` writes a checkpoint of N(0, 0.02)
weights instead (eval/random_checkpoint.py): logits spread over a few units, so --rabitq-max-budget sets the budget.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402
from eval import tasks as T  # noqa: E402

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "initializer_range": 0.02, "use_cache": True,
}
DUMMY = {"llama8b": ("Llama-3.1-8B", LLAMA_8B)}
DUMMY_WEIGHTS = {"sglang": "dummy weights", "normal": "random N(0, 0.02) weights"}


def write_model_config(folder: str | Path, config: dict = LLAMA_8B) -> Path:
    """A model folder holding only config.json, for ``--load-format dummy --skip-tokenizer-init``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def write_llama8b_config(folder: str | Path) -> Path:
    return write_model_config(folder, LLAMA_8B)


def random_ids(vocab: int, n: int, seed: str) -> list[int]:
    rng = random.Random(seed)
    hi = max(200, int(vocab * 0.8))  # stay clear of the special tokens at the top of most vocabularies
    return [rng.randrange(100, hi) for _ in range(n)]


class PromptIds:
    """Prompts of exactly n tokens: tokenized English filler text (the accuracy tasks' haystack) when
    the model has a tokenizer, else random ids. The kind matters for rabitq: attention over random
    ids is diffuse, so top-p keeps much of the context (55 % at 32K on Qwen2.5-0.5B) where text
    gives the peaked attention a sparse method is for. Each seed gives its own text (no shared
    prefix between the requests of a batch)."""

    def __init__(self, vocab: int, tokenizer=None):
        self.vocab, self.tokenizer = vocab, tokenizer
        self.kind = "text" if tokenizer is not None else "random"

    def __call__(self, n: int, seed: str) -> list[int]:
        if self.tokenizer is None:
            return random_ids(self.vocab, n, seed)
        pool, ids, sentences = T.SentencePool(random.Random(f"text-{seed}")), [], 0
        while len(ids) < n:  # filler sentences are ~12 tokens: grow by a margin, tokenize once more
            sentences = max(2 * sentences, (n - len(ids)) // 8 + 16)
            ids = self.tokenizer.encode(" ".join(pool.take(sentences)), add_special_tokens=False)
        return ids[:n]


def decode_stats(results: list[dict]) -> dict:
    """Decode speed from per-request chunk timestamps.

    Steady window: from the last request's first token to the first request's last token; every request is
    decoding there. tok_s = tokens emitted inside the window / window length; tpot = window / tokens per
    request. Falls back to per-request (last - first) / (n - 1) when the window is empty."""
    ok = [r for r in results if "error" not in r and len(r.get("chunk_times", [])) >= 2]
    if not ok:
        return {"tpot_ms": None, "tok_s": None, "window": False, "requests": len(ok)}
    ws = max(r["chunk_times"][0] for r in ok)
    we = min(r["chunk_times"][-1] for r in ok)
    if we > ws:
        toks = sum(c for r in ok for t, c in zip(r["chunk_times"], r["chunk_tokens"]) if ws < t <= we)
        if toks >= len(ok):
            span = we - ws
            return {"tpot_ms": 1e3 * span / (toks / len(ok)), "tok_s": toks / span, "window": True,
                    "window_s": span, "requests": len(ok)}
    tpots = [(r["chunk_times"][-1] - r["chunk_times"][0]) / (sum(r["chunk_tokens"]) - r["chunk_tokens"][0])
             for r in ok if sum(r["chunk_tokens"]) > r["chunk_tokens"][0]]
    if not tpots:
        return {"tpot_ms": None, "tok_s": None, "window": False, "requests": len(ok)}
    tpot = statistics.mean(tpots)
    return {"tpot_ms": 1e3 * tpot, "tok_s": len(ok) / tpot, "window": False, "requests": len(ok)}


def measure(srv, prompts, ctx, batch, gen, tag, before=None) -> dict:
    """One measurement; ``before``: counters at its start (read now when not given). The counters at its
    end are returned under "_after" (pass them on as the next ``before``)."""
    payloads = [{"input_ids": prompts(ctx, f"{tag}-{ctx}-{batch}-{j}"),
                 "sampling_params": {"max_new_tokens": gen, "ignore_eos": True, "temperature": 0.0}}
                for j in range(batch)]
    before = srv.snapshot() if before is None else before
    t0 = time.perf_counter()
    res = S.run_concurrent(lambda p: S.generate_stream(srv.url, p), payloads, batch, desc=f"ctx={ctx} b={batch}")
    wall = time.perf_counter() - t0
    after = srv.snapshot()
    delta = S.metrics_delta(before, after)
    ttft = [r["chunk_times"][0] - r["start"] for r in res if "error" not in r and r["chunk_times"]]
    errors = [r["error"] for r in res if "error" in r]
    return {"context": ctx, "batch": batch, **decode_stats(res), "wall_s": wall,
            "ttft_ms_max": 1e3 * max(ttft) if ttft else None, "errors": len(errors),
            "first_error": errors[0] if errors else None, "budget": delta["budget"], "metrics": delta,
            "_after": after}


def measure_repeated(srv, prompts, ctx, batch, gen, seed, repeats) -> dict:
    """``repeats`` measurements with fresh token ids; the median one by tok/s, all of them kept."""
    runs, before = [], None
    for k in range(repeats):
        srv.flush_cache()
        runs.append(measure(srv, prompts, ctx, batch, gen, f"{seed}-{k}", before))
        before = runs[-1].pop("_after")
    good = sorted((r for r in runs if r.get("tok_s")), key=lambda r: r["tok_s"])
    best = dict(good[len(good) // 2]) if good else dict(runs[-1])
    best["repeats"] = [{k: r.get(k) for k in ("tok_s", "tpot_ms", "budget", "errors")} for r in runs]
    return best


def prefill_time(srv, prompts, ctx, reps) -> float | None:
    """Median time to the first token of a single request of ctx fresh tokens (prefill + its encode); one
    extra request first, not counted (it compiles/allocates for this length)."""
    times = []
    for i in range(reps + 1):
        p = {"input_ids": prompts(ctx, f"prefill-{ctx}-{i}"),
             "sampling_params": {"max_new_tokens": 1, "ignore_eos": True, "temperature": 0.0}}
        try:
            r = S.generate_stream(srv.url, p)
        except Exception:  # noqa: BLE001
            continue
        if r["chunk_times"] and i > 0:
            times.append(r["chunk_times"][0] - r["start"])
    return 1e3 * statistics.median(times) if times else None


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dummy", choices=sorted(DUMMY), help="random weights of a known shape (config.json only)")
    ap.add_argument("--dummy-dir", default="/tmp/rabitq-dummy-models")
    ap.add_argument("--dummy-weights", choices=sorted(DUMMY_WEIGHTS), default="sglang",
                    help="sglang: --load-format dummy (uniform +-1e-3; every logit ties); normal: a written "
                         "checkpoint of N(0, initializer_range) weights (eval/random_checkpoint.py)")
    ap.add_argument("--prompts", choices=["auto", "text", "random"], default="auto",
                    help="prompt tokens: filler text (auto: when the model has a tokenizer) or random ids")


def resolve_model(ap: argparse.ArgumentParser, args) -> tuple[str, PromptIds]:
    """(model name, prompt maker); ``--dummy`` writes its config folder and points ``args.model`` at it.
    ``args.prompts``: ``text`` needs the model's tokenizer, ``auto`` uses it when there is one."""
    if args.dummy:
        shape, cfg = DUMMY[args.dummy]
        weights = getattr(args, "dummy_weights", "sglang")
        name = f"{shape} ({DUMMY_WEIGHTS[weights]})"
        folder = Path(args.dummy_dir) / f"{args.dummy}-{weights}"
        if weights == "normal":
            from eval.random_checkpoint import write_random_checkpoint

            args.model = str(write_random_checkpoint(folder, cfg, seed=getattr(args, "seed", 0)))
        else:
            args.model = str(write_model_config(folder, cfg))
    elif not args.model:
        ap.error("--model or --dummy is required")
    else:
        name = Path(args.model).name
    vocab = int(json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size", 32000))
    kind = getattr(args, "prompts", "random")
    tokenizer = None if kind == "random" or args.dummy else T.load_tokenizer(args.model)
    if kind == "text" and tokenizer is None:
        ap.error(f"--prompts text needs a tokenizer in {args.model}")
    return name, PromptIds(vocab, tokenizer)


# backend kinds: the dense baseline, rabitq as configured, and rabitq with every decode step sparse
# (--rabitq-min-batch-context 0: the sparse path's own speed where the default would attend densely)
ALWAYS_SPARSE = "rabitq-sparse"


def speed_server(args, kind: str, index: int, ctx_len: int) -> S.Server:
    """A server for speed runs: dummy weights where asked, contexts allowed past the model's window."""
    extra = ["--skip-tokenizer-init"] if args.dummy else []
    if args.dummy and getattr(args, "dummy_weights", "sglang") == "sglang":
        extra += ["--load-format", "dummy"]
    env = {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}  # speed only: contexts may pass the model window
    ours = kind != "dense"
    if kind == ALWAYS_SPARSE:  # after the run's rabitq flags: the last value wins
        args = argparse.Namespace(**{**vars(args), "rabitq_args": f"{args.rabitq_args} --rabitq-min-batch-context 0"})
    return S.server_for(args, "rabitq" if ours else kind, index, args.top_p if ours else None, context_length=ctx_len,
                        extra=extra, env=env)


def run_backend(args, kind, index, prompts, ctx_len) -> dict:
    srv = speed_server(args, kind, index, ctx_len)
    out = {"backend": kind, "points": [], "prefill_ms": {}, "skipped": []}
    with srv:
        info = srv.info()
        cap = info.get("max_total_num_tokens") or (info.get("internal_states") or [{}])[0].get("max_total_num_tokens")
        out["max_total_num_tokens"] = cap
        if kind != "dense":
            out["rabitq_config"] = srv.rabitq_config()  # the key bits, top-p and temperature that ran
        contexts = [args.ref_context] + [c for c in args.contexts if c != args.ref_context]
        fits = lambda ctx, b: not cap or b * (ctx + args.gen) <= 0.95 * cap  # noqa: E731
        for b in args.batches:  # warm-up, not recorded: every batch size once, at the reference context
            if fits(args.ref_context, b):
                measure(srv, prompts, args.ref_context, b, min(args.gen, 32), "warm", before={})
        for b in args.batches:
            for ctx in contexts:
                if not fits(ctx, b):
                    out["skipped"].append({"context": ctx, "batch": b, "reason": f"KV pool holds {cap} tokens"})
                    continue
                out["points"].append(measure_repeated(srv, prompts, ctx, b, args.gen, args.seed, args.repeats))
        for ctx in contexts:
            out["prefill_ms"][str(ctx)] = prefill_time(srv, prompts, ctx, args.prefill_reps)
        out["startup_s"] = srv.startup_s
    return out


def combine(runs: dict, ref_ctx: int, model_name: str) -> list[dict]:
    """One row per (context, batch) measured on both backends, with the Amdahl limit."""
    def point(kind, ctx, b):
        return next((p for p in runs.get(kind, {}).get("points", []) if (p["context"], p["batch"]) == (ctx, b)), None)

    rows = []
    for p in runs.get("dense", {}).get("points", []):
        ctx, b = p["context"], p["batch"]
        q, ref = point("rabitq", ctx, b), point("dense", ref_ctx, b)
        if q is None or not p.get("tok_s") or not q.get("tok_s"):
            continue
        pd, pr = runs["dense"]["prefill_ms"].get(str(ctx)), runs["rabitq"]["prefill_ms"].get(str(ctx))
        sparse = point(ALWAYS_SPARSE, ctx, b)
        if sparse and sparse.get("tok_s"):
            sparse = {"tok_s": sparse["tok_s"], "tpot_ms": sparse["tpot_ms"], "budget": sparse.get("budget"),
                      "speedup": sparse["tok_s"] / p["tok_s"]}
        rows.append({
            "model": model_name, "context": ctx, "batch": b,
            "dense_tok_s": p["tok_s"], "rabitq_tok_s": q["tok_s"], "speedup": q["tok_s"] / p["tok_s"],
            "budget": q.get("budget"), "dense_tpot_ms": p["tpot_ms"], "rabitq_tpot_ms": q["tpot_ms"],
            "amdahl_limit": p["tpot_ms"] / ref["tpot_ms"] if ref and ref.get("tpot_ms") else None,
            "dense_prefill_ms": pd, "rabitq_prefill_ms": pr,
            "encode_overhead_ms": pr - pd if pd is not None and pr is not None else None,
            **({"always_sparse": sparse} if sparse and sparse.get("tok_s") else {}),
        })
    return rows


def print_rows(rows) -> None:
    print(f"\n{'ctx':>7}{'batch':>6}{'dense tok/s':>13}{'rabitq tok/s':>14}{'speedup':>9}{'limit':>8}"
          f"{'budget':>8}{'enc ms':>9}{'sparse x':>10}{'budget':>8}")
    for r in rows:
        f = lambda v, s="{:.2f}": "-" if v is None else s.format(v)  # noqa: E731
        sp = r.get("always_sparse") or {}
        print(f"{r['context']:>7}{r['batch']:>6}{r['dense_tok_s']:>13.0f}{r['rabitq_tok_s']:>14.0f}"
              f"{f(r['speedup']):>9}{f(r['amdahl_limit']):>8}{f(r['budget'], '{:.1%}'):>8}"
              f"{f(r['encode_overhead_ms'], '{:.1f}'):>9}{f(sp.get('speedup')):>10}{f(sp.get('budget'), '{:.1%}'):>8}")
    print("speedup = rabitq/dense decode tok/s; limit = dense_tpot(ctx)/dense_tpot(ref ctx); sparse x, budget: "
          f"the {ALWAYS_SPARSE} server (every decode step sparse), where run\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S.add_server_args(ap, port=32000, model_required=False)
    add_model_args(ap)
    ap.add_argument("--contexts", type=S.csv_list(int), default=[8192, 16384, 32768])
    ap.add_argument("--batches", type=S.csv_list(int), default=[1, 8, 32])
    ap.add_argument("--ref-context", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=128, help="new tokens per request")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per point (median kept)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--backends", type=S.csv_list(), default=["dense", "rabitq"],
                    help=f"dense, rabitq, and {ALWAYS_SPARSE} (rabitq with every decode step sparse)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    S.apply_quick(ap, args, {"contexts": [4096, 8192], "batches": [1, 8], "gen": 64, "prefill_reps": 2,
                             "repeats": 2})
    name, prompts = resolve_model(ap, args)
    args.out = args.out or str(S.RESULTS / "speed.json")
    ctx_len = args.context_length or max(args.contexts + [args.ref_context]) + args.gen + 64

    result = {**S.env_info(args.model), "model_name": name, "prompts": prompts.kind, "config": vars(args), "runs": {},
              "rows": []}
    S.run_backends(args, result, lambda kind, i: run_backend(args, kind, i, prompts, ctx_len), "bench_decode")
    result["rows"] = combine(result["runs"], args.ref_context, name)
    S.write_json(args.out, result)
    print_rows(result["rows"])
    return result


if __name__ == "__main__":
    main()
