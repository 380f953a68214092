"""The main workload: many users asking about the same few long documents, plus chats that grow turn by turn.

    python eval/prefix_sharing.py --model /tmp/models/qwen05 --docs 4 --doc-tokens 8000 --users 64 \
        --concurrency 1,8,32 --chats 8 --turns 4
    python eval/prefix_sharing.py --model /tmp/models/smollm2 --quick

Same workload, same order, on a dense server and on a rabitq server (greedy, streaming OpenAI client):
  * shared-prefix questions: ``--users`` distinct questions per concurrency level about ``--docs`` documents
    (system + document first, question last, so requests about one document share the radix-cache prefix);
  * growing chats: ``--chats`` conversations of ``--turns`` turns; each turn appends the model's own previous
    answer and a new question (the prefix grows; its decoded tail is reused by the next turn).
Reported per backend: answer agreement with dense (exact greedy text; token-prefix fraction) over requests
with identical prompts, answer correctness, radix cache hit rate, rabitq codes reused vs encoded, budget,
TTFT, time per output token (streaming chunk times), throughput. Writes eval/results/prefix_sharing.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402
from eval import tasks as T  # noqa: E402


# ------------------------------------------------------------------------------------------- workload


def build_workload(args, counter) -> dict:
    docs = [T.make_document(args.doc_tokens, args.seed, i, counter) for i in range(args.docs)]
    per_doc = -(-args.users * len(args.concurrency) // args.docs) + -(-args.chats * args.turns // args.docs)
    pools = {d: T.document_questions(doc, per_doc, args.seed) for d, doc in enumerate(docs)}
    nxt = {d: 0 for d in pools}

    def take(d):
        nxt[d] += 1
        return pools[d][nxt[d] - 1]

    levels = []
    for c in args.concurrency:
        reqs = []
        for j in range(args.users):
            d = j % args.docs
            q, a = take(d)
            reqs.append({"doc": d, "question": q, "answer": a})
        levels.append({"concurrency": c, "requests": reqs})
    chats = []
    for k in range(args.chats):
        d = k % args.docs
        chats.append({"doc": d, "turns": [dict(zip(("question", "answer"), take(d))) for _ in range(args.turns)]})
    extra = T.make_document(args.doc_tokens, args.seed + 1000, 0, counter)
    warmup = [T.document_messages(extra, q) for q, _ in T.document_questions(extra, 4, args.seed)]
    return {"docs": docs, "levels": levels, "chats": chats, "warmup": warmup,
            "doc_tokens": [counter(doc.text) for doc in docs]}


def prompt_key(messages) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- run


def run_chat(client, doc, chat, max_tokens) -> list[dict]:
    """Turns in order; the history holds this backend's own answers."""
    messages = T.document_messages(doc, chat["turns"][0]["question"])
    out = []
    for t, turn in enumerate(chat["turns"]):
        if t > 0:
            messages = messages + [{"role": "user", "content": turn["question"]}]
        r = S.chat_stream(client, messages, max_tokens)
        r.update(turn=t, prompt_key=prompt_key(messages), expected=turn["answer"])
        out.append(r)
        messages = messages + [{"role": "assistant", "content": r["text"]}]
    return out


def phase_stats(results: list[dict], wall_s: float, delta: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft_s"] for r in ok if r.get("ttft_s") is not None)
    decode_s = sum(r["decode_s"] for r in ok if r.get("decode_s") is not None)
    steps = sum((r.get("completion_tokens") or len(r["chunk_times"])) - 1 for r in ok if r.get("decode_s") is not None)
    gen = sum(r.get("completion_tokens") or 0 for r in ok)
    prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
        "ttft_ms_mean": 1e3 * sum(ttfts) / len(ttfts) if ttfts else None,
        "ttft_ms_p50": 1e3 * ttfts[len(ttfts) // 2] if ttfts else None,
        "tpot_ms": 1e3 * decode_s / steps if steps > 0 else None, "decode_s": decode_s, "decode_steps": steps,
        "output_tok_s": gen / wall_s if wall_s > 0 else None, "completion_tokens": gen,
        "prompt_tokens": prompt, "cached_tokens": cached,
        "usage_cache_hit_rate": cached / prompt if prompt else None,
        "correct": sum(T.score_any(r["text"], [r["expected"]]) for r in ok) / len(ok) if ok else None,
        "metrics": delta,
    }


def run_backend(args, work, kind, index) -> dict:
    docs = work["docs"]
    out = {"backend": kind, "levels": [], "chats": None, "repeat": None}
    with S.server_for(args, kind, index, args.top_p if kind == "rabitq" else None) as srv:
        client = srv.openai()
        if kind == "rabitq":
            out["rabitq_config"] = srv.rabitq_config()
        S.warmup_chat(client, work["warmup"])  # an unrelated document: shares only the system prompt
        start = before = srv.snapshot()
        for level in work["levels"]:
            c = level["concurrency"]

            def ask(req):
                msgs = T.document_messages(docs[req["doc"]], req["question"])
                r = S.chat_stream(client, msgs, args.max_tokens)
                r.update(prompt_key=prompt_key(msgs), expected=req["answer"])
                return r

            t0 = time.perf_counter()
            res = S.run_concurrent(ask, level["requests"], c, desc=f"{kind} users c={c}")
            wall = time.perf_counter() - t0
            after = srv.snapshot()
            stats, before = phase_stats(res, wall, S.metrics_delta(before, after)), after
            out["levels"].append({"concurrency": c, **stats, "results": [_slim(r) for r in res]})
        if work["chats"]:
            t0 = time.perf_counter()
            res = S.run_concurrent(lambda ch: run_chat(client, docs[ch["doc"]], ch, args.max_tokens), work["chats"],
                                   len(work["chats"]), desc=f"{kind} chats")
            wall = time.perf_counter() - t0
            after = srv.snapshot()
            flat = [t for chat in res for t in (chat if isinstance(chat, list) else [chat])]
            stats, before = phase_stats(flat, wall, S.metrics_delta(before, after)), after
            out["chats"] = {**stats, "results": [[_slim(t) for t in chat] if isinstance(chat, list) else [chat]
                                                 for chat in res]}
        out["totals"] = S.metrics_delta(start, before)  # users + chats (not the repeat below)
        if args.repeat_check and work["levels"]:
            # the first level again on the same server: a noise floor for agreement (fully cached prompts)
            level = work["levels"][0]
            res = S.run_concurrent(
                lambda req: S.chat_stream(client, T.document_messages(docs[req["doc"]], req["question"]),
                                          args.max_tokens),
                level["requests"], level["concurrency"], desc=f"{kind} repeat")
            first = out["levels"][0]["results"]
            same = [float(a.get("text") == b.get("text")) for a, b in zip(first, res)]
            out["repeat"] = {"self_exact": S.mean_known(same)}
        out["startup_s"] = srv.startup_s
    everything = [r for lv in out["levels"] for r in lv["results"]]
    if out["chats"]:
        everything += [t for chat in out["chats"]["results"] for t in chat]
    steps = sum(r.get("steps") or 0 for r in everything)
    out["tpot_ms"] = 1e3 * sum(r.get("decode_s") or 0 for r in everything) / steps if steps else None
    return out


def _slim(r: dict) -> dict:
    """What we keep per request (chunk timestamps dropped)."""
    if "error" in r:
        return r
    n = r.get("completion_tokens") or len(r["chunk_times"])
    return {k: r.get(k) for k in ("text", "ttft_s", "tpot_s", "decode_s", "completion_tokens", "prompt_tokens",
                                  "cached_tokens", "prompt_key", "expected", "turn")} | \
        {"steps": n - 1 if r.get("decode_s") is not None else 0}


# ------------------------------------------------------------------------------------------ agreement


def prefix_fraction(a: list, b: list) -> float:
    """Length of the common prefix over the longer sequence (1.0 when both are empty)."""
    if not a and not b:
        return 1.0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b))


def agreement(ref: list[dict], other: list[dict], ids) -> dict:
    """Exact-match and token-prefix agreement over pairs whose prompts are identical (same prompt_key)."""
    exact, prefix, diverged = [], [], 0
    for a, b in zip(ref, other):
        if "error" in a or "error" in b:
            continue
        if a.get("prompt_key") != b.get("prompt_key"):
            diverged += 1  # an earlier turn already answered differently: inputs differ
            continue
        exact.append(float(a["text"] == b["text"]))
        prefix.append(prefix_fraction(ids(a["text"]), ids(b["text"])))
    return {"exact": S.mean_known(exact), "token_prefix": S.mean_known(prefix), "compared": len(exact),
            "diverged_inputs": diverged}


def compare(dense: dict, ours: dict, ids) -> dict:
    out = {"levels": []}
    pairs_ref, pairs_ours = [], []
    for a, b in zip(dense["levels"], ours["levels"]):
        out["levels"].append({"concurrency": a["concurrency"], **agreement(a["results"], b["results"], ids)})
        pairs_ref += a["results"]
        pairs_ours += b["results"]
    if dense.get("chats") and ours.get("chats"):
        ra, rb = dense["chats"]["results"], ours["chats"]["results"]
        turns = max(len(c) for c in ra)
        out["chat_turns"] = []
        for t in range(turns):
            ta = [c[t] for c in ra if len(c) > t]
            tb = [c[t] for c in rb if len(c) > t]
            out["chat_turns"].append({"turn": t, **agreement(ta, tb, ids)})
        pairs_ref += [t for c in ra for t in c]
        pairs_ours += [t for c in rb for t in c]
    out["overall"] = agreement(pairs_ref, pairs_ours, ids)
    return out


# ------------------------------------------------------------------------------------------------ report


def table(runs: dict, agree: dict | None) -> list[tuple]:
    """(metric, dense, rabitq) rows for the final printout."""
    def get(run, f):
        try:
            return f(run)
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            return None

    def tot(k):
        return lambda r: r["totals"][k]

    rows = [
        ("answers correct (users)", lambda r: S.mean_known([lv["correct"] for lv in r["levels"]])),
        ("answers correct (chats)", lambda r: r["chats"]["correct"]),
        ("radix cache hit rate (metrics)", tot("cache_hit_rate")),
        ("cache hit rate (usage)", lambda r: S.mean_known([lv["usage_cache_hit_rate"] for lv in r["levels"]]
                                                   + [r["chats"]["usage_cache_hit_rate"] if r["chats"] else None])),
        ("codes reused", tot("codes_reused")),
        ("codes encoded", tot("codes_encoded")),
        ("encode seconds", tot("encode_s")),
        ("budget (attended/context)", tot("budget")),
        ("TPOT ms (all)", lambda r: r["tpot_ms"]),
    ]
    for i, c in enumerate(lv["concurrency"] for lv in next(iter(runs.values()))["levels"]):
        # wall time first: TPOT is taken from the client's stream, and a server whose tokenizer is busy
        # delivers tokens late and in bursts (first token late, the rest at once: TPOT looks tiny)
        rows += [(f"c={c} wall s", lambda r, i=i: r["levels"][i]["wall_s"]),
                 (f"c={c} TTFT ms", lambda r, i=i: r["levels"][i]["ttft_ms_mean"]),
                 (f"c={c} TPOT ms", lambda r, i=i: r["levels"][i]["tpot_ms"]),
                 (f"c={c} output tok/s", lambda r, i=i: r["levels"][i]["output_tok_s"])]
    rows += [("chats wall s", lambda r: r["chats"]["wall_s"]),
             ("chats TTFT ms", lambda r: r["chats"]["ttft_ms_mean"]),
             ("chats TPOT ms", lambda r: r["chats"]["tpot_ms"])]
    out = [(name, get(runs.get("dense"), f), get(runs.get("rabitq"), f)) for name, f in rows]
    if agree:
        out.append(("agreement exact (vs dense)", 1.0, agree["overall"]["exact"]))
        out.append(("agreement token prefix", 1.0, agree["overall"]["token_prefix"]))
    out.append(("self-agreement on repeat", get(runs.get("dense"), lambda r: r["repeat"]["self_exact"]),
                get(runs.get("rabitq"), lambda r: r["repeat"]["self_exact"])))
    return out


def print_table(rows) -> None:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    print(f"\n{'metric':<34}{'dense':>14}{'rabitq':>14}")
    for name, a, b in rows:
        print(f"{name:<34}{fmt(a):>14}{fmt(b):>14}")
    print()


def summary_block(runs: dict, agree: dict | None) -> dict:
    ours = runs.get("rabitq") or {}
    totals = ours.get("totals") or {}
    return {"agreement": agree["overall"]["exact"] if agree else None,
            "codes_reused": totals.get("codes_reused"), "codes_encoded": totals.get("codes_encoded"),
            "dense_tpot_ms": (runs.get("dense") or {}).get("tpot_ms"), "rabitq_tpot_ms": ours.get("tpot_ms")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S.add_server_args(ap, port=31000)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=6000)
    ap.add_argument("--users", type=int, default=32, help="questions per concurrency level")
    ap.add_argument("--concurrency", type=S.csv_list(int), default=[1, 8, 32])
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--backends", type=S.csv_list(), default=["dense", "rabitq"])
    ap.add_argument("--no-repeat-check", dest="repeat_check", action="store_false",
                    help="skip re-sending the first level (the self-agreement noise floor)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    S.apply_quick(ap, args, {"docs": 2, "doc_tokens": 3000, "users": 16, "concurrency": [4, 16], "chats": 4,
                             "turns": 3, "max_tokens": 48})
    args.out = args.out or str(S.RESULTS / "prefix_sharing.json")

    counter = T.TokenCounter(T.load_tokenizer(args.model))
    work = build_workload(args, counter)
    result = {**S.env_info(args.model), "config": vars(args), "doc_tokens": work["doc_tokens"], "runs": {}}
    S.run_backends(args, result, lambda kind, i: run_backend(args, work, kind, i), "prefix_sharing")
    runs = {k: v for k, v in result["runs"].items() if "error" not in v}
    agree = compare(runs["dense"], runs["rabitq"], counter.ids) if "dense" in runs and "rabitq" in runs else None
    result["agreement"] = agree
    result["table"] = table(runs, agree) if runs else []
    result["summary"] = summary_block(runs, agree)
    S.write_json(args.out, result)
    print_table(result["table"])
    return result


if __name__ == "__main__":
    main()
