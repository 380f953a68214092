"""End-to-end smoke test of `--attention-backend rabitq` against the dense `flashinfer` backend:
six servers of one model on one GPU, started one after another by this script:

    python eval/e2e_smoke.py --model /tmp/models/smollm2 --out eval/results/e2e_smoke.json

Checks: OpenAI chat / completion / streaming answer; `--rabitq-top-p 1.0` gives the same greedy
text as dense on every prompt, and so does a server at its defaults, whose automatic
`--rabitq-min-batch-context` decodes every batch of this smoke densely; a multi-turn conversation
over a shared long document reuses codes (radix cache) and matches dense; CUDA graphs on and off give
identical output, with a batch-context threshold that sends about half of the prompts down each path,
so both graph variants are replayed (the dense backend's own on/off agreement is reported beside it);
a repeat run on the same server is identical; the first concurrent batches (3, 9 and 16 requests,
sizes the server has not run yet) compile no more Triton kernels than they make the dense server
compile. Every greedy pass starts from an empty radix cache, so all servers compute the same prompts
the same way.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.server import Server, chat_once, chat_stream, env_info, rabitq_snapshot, run_concurrent, write_json  # noqa: E402

NAMES = ["Arlen", "Bexley", "Corin", "Dorset", "Elmira", "Fenwick", "Galen", "Harlow", "Isolde", "Jory"]
THINGS = ["lighthouse", "orchard", "violin", "glacier", "telescope", "canal", "library", "windmill"]


def document(seed: int, facts: int) -> tuple[str, list[tuple[str, str]]]:
    rng = random.Random(seed)
    lines, qa = [], []
    for i in range(facts):
        who, what, num = rng.choice(NAMES), rng.choice(THINGS), rng.randint(100, 999)
        lines.append(f"Record {i}: {who} of district {i % 17} looks after the {what} number {num}.")
        qa.append((f"In record {i}, which number does {who}'s {what} have?", str(num)))
    return "\n".join(lines), qa


def prompts(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        doc, qa = document(100 + i, 40 + 15 * i)  # from ~0.6K to ~5K tokens
        q, _ = qa[(7 * i) % len(qa)]
        out.append([{"role": "user", "content": f"{doc}\n\nAnswer briefly. {q}"}])
    return out


def greedy_texts(server: Server, convs: list[list[dict]], max_tokens: int) -> list[str]:
    """Greedy answers, one request at a time, from an empty radix cache: a prefix hit changes which
    kernel computes the prompt (extend over cached KV vs one prefill), so passes that start from
    different cache contents can differ in the last bits on any backend, dense included."""
    for _ in range(10):
        if server.flush_cache():
            break
        time.sleep(1.0)  # flushing is refused while requests are running
    else:
        raise RuntimeError(f"{server.backend} on :{server.port} refused /flush_cache")
    client = server.openai()
    return [chat_once(client, c, max_tokens)["text"] for c in convs]


def compiled_kernels(cache_dir: Path) -> int:
    """Kernel variants Triton has compiled into a cache directory (one entry each)."""
    return sum(1 for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.is_dir() else 0


def new_batch_sizes(server: Server, max_tokens: int) -> None:
    """Batches of 3, 9 and 16 concurrent requests: a server that has run one request at a time
    reaches new batch-size classes (Triton specializes integers as 1, multiples of 16, other)."""
    client = server.openai()
    for c in (3, 9, 16):
        convs = [[{"role": "user", "content": f"Write {n + 2} words about the number {n}."}] for n in range(c)]
        run_concurrent(lambda conv: chat_once(client, conv, max_tokens), convs, c)


MULTI_TURN_DOC = (7, 220)  # seed and records of the shared document
SWITCH_AT = 2048  # --rabitq-min-batch-context of the servers whose paths are compared


def multi_turn_truth(users: int, turns: int) -> list[str]:
    """The number each multi-turn question asks for, in ``multi_turn``'s answer order."""
    _, qa = document(*MULTI_TURN_DOC)
    return [qa[(u * 31 + t * 7) % len(qa)][1] for u in range(users) for t in range(turns)]


def multi_turn(server: Server, users: int, turns: int, max_tokens: int) -> list[str]:
    """Several users ask different questions about one shared document, turn after turn."""
    doc, qa = document(*MULTI_TURN_DOC)
    client = server.openai()
    answers = []
    for u in range(users):
        messages = [{"role": "system", "content": "Answer from the records below.\n" + doc}]
        for t in range(turns):
            messages.append({"role": "user", "content": qa[(u * 31 + t * 7) % len(qa)][0]})
            text = chat_once(client, messages, max_tokens)["text"]
            messages.append({"role": "assistant", "content": text})
            answers.append(text)
    return answers


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--mem-fraction-static", type=float, default=0.12, help="of each of the six servers")
    ap.add_argument("--out", default="eval/results/e2e_smoke.json")
    ap.add_argument("--rabitq-args", default="",
                    help='extra flags for every rabitq server: --rabitq-args="--rabitq-center calibrate"')
    args = ap.parse_args(argv)
    ours = shlex.split(args.rabitq_args)
    # the prompts run from ~0.6K to ~5K tokens and the multi-turn document is ~4.5K: about half decode
    # densely, the rest sparsely (the prompt itself is counted, so a request stays on one path)
    switch = ["--rabitq-min-batch-context", str(SWITCH_AT)]
    logs = Path(args.out).parent / "logs"
    env = {"SGLANG_RABITQ_LOG_EVERY_S": "0"}  # export counters after every batch
    # ports 10 apart: SGLang also binds a few ports right above the one it serves on
    common = dict(mem_fraction_static=args.mem_fraction_static, log_path=None, env=env)
    # a fresh Triton cache each for the dense and the default rabitq server: what they compile while
    # serving shows as new entries
    caches = {name: logs / f"triton-cache-{name}" for name in ("dense", "sparse")}
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    own_cache = {name: {**env, "TRITON_CACHE_DIR": str(cache)} for name, cache in caches.items()}
    servers = {
        "dense": Server(args.model, "flashinfer", args.port, ["--disable-prefill-cuda-graph"], **{**common, "log_path": logs / "smoke-dense.log", "env": own_cache["dense"]}),
        "p1": Server(args.model, "rabitq", args.port + 10, ours + ["--rabitq-top-p", "1.0"], **{**common, "log_path": logs / "smoke-p1.log"}),
        "sparse": Server(args.model, "rabitq", args.port + 20, ours + switch, **{**common, "log_path": logs / "smoke-sparse.log", "env": own_cache["sparse"]}),
        "nograph": Server(args.model, "rabitq", args.port + 30, ours + switch + ["--disable-cuda-graph"], **{**common, "log_path": logs / "smoke-nograph.log"}),
        # the defaults: every batch of this smoke is below the automatic threshold
        "auto": Server(args.model, "rabitq", args.port + 50, ours, **{**common, "log_path": logs / "smoke-auto.log"}),
        # the dense backend's own graph on/off agreement: the floor for rabitq's (reported)
        "dense-nograph": Server(args.model, "flashinfer", args.port + 40, ["--disable-cuda-graph"], **{**common, "log_path": logs / "smoke-dense-nograph.log"}),
    }
    errors = {}
    # one after another, each once its KV pool is sized: SGLang sizes the pool from the free GPU
    # memory it sees, so servers that profile at the same time starve each other
    for name, srv in servers.items():
        try:
            srv.launch()
            srv.wait_for_log()
        except Exception as e:  # reported as a failed check, the other servers still run
            errors[name] = repr(e)[-3000:]
    for name, srv in servers.items():
        if name not in errors:
            try:
                srv.wait_ready()
            except Exception as e:
                errors[name] = repr(e)[-3000:]
    checks = []

    def result(complete: bool) -> dict:
        return {**env_info(args.model), "checks": checks, "passed": sum(c["passed"] for c in checks),
                "total": len(checks), "complete": complete}

    def check(name, passed, **detail):
        checks.append({"check": name, "passed": bool(passed), **detail})
        print(("PASS " if passed else "FAIL ") + name, detail if not passed else "", flush=True)
        write_json(args.out, result(complete=False))  # what ran so far survives an interrupted run

    try:
        for name, err in errors.items():
            check(f"server {name} starts", False, error=err)
        # the CUDA-graph-off server gets the same first requests: with --rabitq-center calibrate the
        # centre is the mean of a server's first prefill keys, so the two must see the same ones
        for name in ("sparse", "nograph"):
            if name in errors:
                continue
            client = servers[name].openai()
            report = check if name == "sparse" else (lambda *a, **k: None)
            r = chat_once(client, [{"role": "user", "content": "What is the capital of France?"}], 16)
            report("openai chat", len(r["text"].strip()) > 0, text=r["text"])
            c = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
            report("openai completion", len(c.choices[0].text.strip()) > 0, text=c.choices[0].text)
            s = chat_stream(client, [{"role": "user", "content": "Count from 1 to 5."}], 24)
            report("openai streaming", len(s["chunk_times"]) > 1 and len(s["text"]) > 0, text=s["text"])
        convs = prompts(args.prompts)
        texts = {n: greedy_texts(srv, convs, args.max_tokens) for n, srv in servers.items() if n not in errors}
        for name, what in (("p1", "top-p 1.0"), ("auto", "below the automatic batch-context threshold:")):
            if "dense" in texts and name in texts:
                same = sum(a == b for a, b in zip(texts["dense"], texts[name]))
                check(f"{what} greedy text identical to dense", same == len(convs), identical=same, of=len(convs),
                      mismatches=[(a, b) for a, b in zip(texts["dense"], texts[name]) if a != b][:3])
        for name in ("dense", "sparse", "nograph"):  # a server that is not repeatable cannot match another one
            if name in texts:
                again = greedy_texts(servers[name], convs, args.max_tokens)
                same = sum(a == b for a, b in zip(texts[name], again))
                if name == "dense":  # the floor: what a dense server repeats of itself
                    check("dense repeat run identical (reported)", True, identical=same, of=len(convs))
                else:
                    check(f"{name} repeat run identical", same == len(convs), identical=same, of=len(convs))
        if "sparse" in texts and "nograph" in texts:
            same = sum(a == b for a, b in zip(texts["sparse"], texts["nograph"]))
            if "dense" in texts and "dense-nograph" in texts:
                dense_same = sum(a == b for a, b in zip(texts["dense"], texts["dense-nograph"]))
                check("dense backend CUDA graph on/off (reported)", True, identical=dense_same, of=len(convs))
            check("CUDA graph on/off identical", same == len(convs), identical=same, of=len(convs),
                  mismatches=[(a, b) for a, b in zip(texts["sparse"], texts["nograph"]) if a != b][:3])
        if "dense" in texts and "sparse" in texts:
            same = sum(a == b for a, b in zip(texts["dense"], texts["sparse"]))
            check(f"default top-p greedy text vs dense, sparse from {SWITCH_AT} tokens (reported)", True,
                  identical=same, of=len(convs))
        if "dense" not in errors and "sparse" not in errors:
            before = rabitq_snapshot(servers["sparse"].url)
            dense_ans = multi_turn(servers["dense"], users=3, turns=3, max_tokens=32)
            ours_ans = multi_turn(servers["sparse"], users=3, turns=3, max_tokens=32)
            after = rabitq_snapshot(servers["sparse"].url)
            reused = (after.get("codes_reused") or 0) - (before.get("codes_reused") or 0)
            encoded = (after.get("codes_encoded") or 0) - (before.get("codes_encoded") or 0)
            agree = sum(a == b for a, b in zip(dense_ans, ours_ans))
            attended = (after.get("attended") or 0) - (before.get("attended") or 0)
            context = (after.get("context") or 0) - (before.get("context") or 0)
            check("multi-turn shared prefix reuses codes", reused > encoded > 0, codes_reused=reused, codes_encoded=encoded,
                  budget=attended / context if context else None)
            truth = multi_turn_truth(users=3, turns=3)
            # dense itself misreads some records: how many each gets right says whose answers are wrong
            right = {name: sum(t in a for t, a in zip(truth, ans)) for name, ans in (("dense", dense_ans), ("rabitq", ours_ans))}
            check("multi-turn answers match dense (default top-p)", agree >= len(dense_ans) - 1, agree=agree,
                  of=len(dense_ans), correct_dense=right["dense"], correct_rabitq=right["rabitq"], truth=truth,
                  dense=dense_ans, rabitq=ours_ans)
            if "p1" not in errors:
                p1_ans = multi_turn(servers["p1"], users=3, turns=3, max_tokens=32)
                same = sum(a == b for a, b in zip(dense_ans, p1_ans))
                check("multi-turn answers at top-p 1.0 identical to dense", same == len(dense_ans), identical=same,
                      of=len(dense_ans))
        if "dense" not in errors and "sparse" not in errors:
            compiles = {}
            for name in ("dense", "sparse"):  # every earlier request ran alone
                before = compiled_kernels(caches[name])
                new_batch_sizes(servers[name], 16)
                compiles[name] = compiled_kernels(caches[name]) - before
            check("new batch sizes compile no more Triton kernels than dense", compiles["sparse"] <= compiles["dense"],
                  rabitq=compiles["sparse"], dense=compiles["dense"])
    finally:
        for srv in servers.values():
            srv.stop()
    final = result(complete=True)
    write_json(args.out, final)
    return final


if __name__ == "__main__":
    main()
