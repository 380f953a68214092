"""One decode step of attention (one layer): RaBitQ score + select + sparse attention vs SGLang's
dense decode kernels (FlashInfer's and SGLang's Triton kernel), same GPU, same run.

    python eval/bench_kernels.py --out eval/results/kernels.json

    python eval/bench_kernels.py --breakdown --out eval/results/kernels_breakdown.json

``--breakdown`` times each launch of the step on its own (graph replay), with num_warps variants of
the two big kernels, and the score pass's estimate by nibble table and on the tensor cores (2-8
tiles a warp per round, its slots loaded a round ahead or not), to show where the time goes;
``--programs-per-sm 8,16,32`` repeats it at other chunk counts.

The budget is set by planting "hot" keys aligned with their queries' group (a fraction of every
request's tokens): top-p then keeps about that fraction, and the measured budget (tokens attended
/ context, from the kernel's own counters) is reported beside each row. Where the planted keys do not
dominate (the Qwen2.5-0.5B shape: 7 heads of D 64 a kv-head keep 24-48 %), ``--max-budget`` runs the step
as served with ``--rabitq-max-budget``: each kv-head's union is cut to about that fraction.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eval.decode_step import SHAPES, Setup, bench, graph_time  # noqa: E402
from eval.server import csv_list  # noqa: E402
from sglang_rabitq.kernels import prepare_query  # noqa: E402
import sglang_rabitq.kernels.decode as decode  # noqa: E402
from sglang_rabitq.kernels.score import mma_estimate, score_chunks  # noqa: E402
from sglang_rabitq.kernels.select import cap_union, top_p_threshold  # noqa: E402
from sglang_rabitq.kernels.sparse_attention import merge_partials, sparse_attention  # noqa: E402


def copy_bandwidth():
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src)) / 1e6
    return 2 * src.numel() / t / 1e9  # GB/s, bytes read + written


def stages(s: Setup, top_p, warps=(2, 4, 8), max_budget: float = 1.0):
    """Each launch of one step on its own (run ``s.ours(top_p)`` once first: it fills the workspace).
    ``max_budget`` < 1: the threshold stage is the threshold and the cap together, as the step launches
    them, so that the attention timed after it reads the capped thresholds."""
    ws, bs, sm = s.ws, s.bs, s.d**-0.5
    nc = ws.num_chunks(bs)
    qscal, qtable, thr, plan = ws.qscal[:bs], ws.qtable[:bs], ws.thr[:bs], ws.plan.rows[:bs]
    # as rabitq_decode_layer launches them by default (top-p over the scored region: no prior mass; a
    # lazy-encode list of padding)
    pending = torch.full((bs * 64,), -1, dtype=torch.int64, device=s.q.device)
    out = {"prepare_query": lambda: prepare_query(s.q, s.rot, qscal, qtable, k_buf=s.k, center=s.center,
                                                  pending=pending, codes=s.codes, factor=s.factor)}
    score = lambda **kw: lambda: score_chunks(qtable, qscal, s.codes, s.factor, s.r2t, plan, ws.logits,  # noqa: E731
                                              ws.stats, sm, s.hkv, nc, **kw)
    out["score"] = score()  # as the decode step launches it
    out["score_hist_shared"] = score(ballot=False)  # the histograms by tl.histogram (shared memory)
    for r in (64, 80, 96):  # register caps: more programs per SM
        out[f"score_r{r}"] = score(max_registers=r)
    for w in warps:
        out[f"score_w{w}"] = score(num_warps=w)
        if w < 8 and mma_estimate(s.q.device):  # the nibble table, and the tensor cores at 2-8 tiles a round
            out[f"score_table_w{w}"] = score(num_warps=w, mma=False)
            for r in (2, 4, 8):
                for a in (0, 1):  # the next round's slots loaded ahead or not
                    out[f"score_mma_w{w}_r{r}_a{a}"] = score(num_warps=w, mma=True, mma_rounds=r, slots_ahead=bool(a))
    if max_budget < 1.0:
        head_max = ws.head_max[:bs]

        def threshold_and_cap():
            top_p_threshold(ws.stats, thr, top_p, nc, None, head_max)
            cap_union(ws.logits, plan, thr, head_max, ws.union_count, max_budget, s.hkv, nc)
        out["threshold_cap"] = threshold_and_cap
    else:
        out["threshold"] = lambda: top_p_threshold(ws.stats, thr, top_p, nc)
    attention = lambda **kw: lambda: sparse_attention(  # noqa: E731
        s.q, s.k, s.v, ws.logits, ws.index, s.r2t, plan, thr, ws.partial_out, ws.partial_lse, ws.kept, sm, nc, False, **kw)
    out["attention"] = attention(**(decode.ATTENTION_LAUNCH or {}))  # as the decode step launches it
    for w in warps:
        out[f"attention_w{w}"] = attention(num_warps=w)
    out["merge"] = lambda: merge_partials(ws.partial_out, ws.partial_lse, s.out, nc + 1)
    return out


def flashinfer_step(s: Setup):
    """FlashInfer's dense decode of the same batch (page size 1)."""
    import flashinfer

    indptr = torch.arange(s.bs + 1, device="cuda", dtype=torch.int32) * s.ctx
    indices = s.r2t.flatten()
    last = torch.ones(s.bs, device="cuda", dtype=torch.int32)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"), "NHD",
        use_tensor_cores=s.hq // s.hkv >= 4)
    wrapper.plan(indptr, indices, last, s.hq, s.hkv, s.d, 1,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    kc, vc = s.k.view(-1, 1, s.hkv, s.d), s.v.view(-1, 1, s.hkv, s.d)
    return lambda: wrapper.run(s.q, (kc, vc))


def triton_dense_step(s: Setup):
    """SGLang's Triton dense decode of the same batch."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    splits = 16
    indptr = torch.arange(s.bs + 1, device="cuda", dtype=torch.int32) * s.ctx
    indices = s.r2t.flatten().to(torch.int64)
    logits = torch.empty(s.bs, s.hq, splits, s.d, device="cuda")
    lse = torch.empty(s.bs, s.hq, splits, device="cuda")
    nsplit = torch.full((s.bs,), splits, device="cuda", dtype=torch.int32)
    o = torch.empty_like(s.q)
    return lambda: decode_attention_fwd(s.q, s.k, s.v, o, indptr, indices, logits, lse, nsplit, splits,
                                        s.d**-0.5, 1.0, 1.0)


def _meta(bw):
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat(), copy_gbps=bw,
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    for name in ("sglang", "flashinfer"):
        try:
            meta[name] = __import__(name).__version__
        except Exception:  # a baseline's package missing here: its version is not recorded
            meta[name] = None
    return meta


def attention_config(text: str) -> dict:
    """``--attention-configs`` entry ``BLOCK_N/WARPS/STAGES/REGS`` (REGS 0: uncapped)."""
    bn, w, st, r = (int(x) for x in text.split("/"))
    return dict(block_n=bn, num_warps=w, num_stages=st, max_registers=r or None)


def breakdown(args, bw):
    rows = []
    for shape, ctx, bs, pps in itertools.product(args.shapes, args.contexts or (32768, 131072), args.batches or (1, 32),
                                                 args.programs_per_sm):
        hq, hkv, d = SHAPES[shape]
        decode.PROGRAMS_PER_SM = pps  # read when the workspace picks its chunk count
        s = Setup(hq, hkv, d, ctx, bs)
        s.plant(0.10)
        step = s.ours(args.top_p, max_budget=args.max_budget)
        row = dict(shape=shape, context=ctx, batch=bs, programs_per_sm=decode.programs_per_sm(bs, hkv),
                   max_budget=args.max_budget, step_us=graph_time(step),
                   num_chunks=s.ws.num_chunks(bs), budget=s.budget())
        row.update({name: graph_time(fn) for name, fn in stages(s, args.top_p, max_budget=args.max_budget).items()
                    if not args.stages or name in args.stages})
        for text in args.attention_configs or ():  # the whole step and the attention launch at each
            decode.ATTENTION_LAUNCH = attention_config(text)
            name = text.replace("/", "_")
            row[f"step_{name}"] = graph_time(s.ours(args.top_p, max_budget=args.max_budget))
            attention = stages(s, args.top_p, warps=(), max_budget=args.max_budget)["attention"]
            row[f"attention_{name}"] = graph_time(attention)
        decode.ATTENTION_LAUNCH = None
        rows.append(row)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del s
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=csv_list(int), help="default 8K, 32K, 128K (--breakdown: 32K, 128K)")
    ap.add_argument("--batches", type=csv_list(int), help="default 1, 8, 32 (--breakdown: 1, 32)")
    ap.add_argument("--budgets", type=csv_list(float), default=[0.05, 0.10, 0.20])
    ap.add_argument("--shapes", type=csv_list(), default=["llama3.1-8b", "qwen2.5-0.5b"], help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-budget", type=float, default=1.0,
                    help="the cap on each kv-head's union (--rabitq-max-budget); the step's time includes its launches")
    ap.add_argument("--breakdown", action="store_true", help="time each launch of the step (see above)")
    ap.add_argument("--programs-per-sm", type=csv_list(int),
                    help="each of these targets of programs per SM, i.e. chunks per request and kv-head "
                         "(default: the package's rule, decode.programs_per_sm)")
    ap.add_argument("--stages", type=csv_list(), help="--breakdown: time only these launches (default: all)")
    ap.add_argument("--attention-configs", type=csv_list(),
                    help="--breakdown: also the step and the attention launch with each of these launch "
                         "configurations of the attention, BLOCK_N/WARPS/STAGES/REGS (REGS 0: uncapped), e.g. 32/4/3/64")
    ap.add_argument("--out", default="eval/results/kernels.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    args.programs_per_sm = args.programs_per_sm or [decode.PROGRAMS_PER_SM]
    if args.breakdown:
        rows = breakdown(args, bw)
        meta = _meta(bw)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        cols = [k for k in rows[0] if k not in ("shape", "context", "batch")]
        with open(args.out.replace(".json", ".md"), "w") as f:
            f.write(f"# One decode step, launch by launch (us, CUDA-graph replay)\n\n{meta['gpu']}, {meta['date']}. "
                    f"Command: `{meta['command']}`\n\n| shape | context | batch | " + " | ".join(cols) + " |\n"
                    + "|---" * (3 + len(cols)) + "|\n")
            for r in rows:
                f.write(f"| {r['shape']} | {r['context']} | {r['batch']} | "
                        + " | ".join(f"{r[c]:.3g}" for c in cols) + " |\n")
        print("wrote", args.out)
        return
    rows = []
    for shape, ctx, bs, pps in itertools.product(args.shapes, args.contexts or (8192, 32768, 131072),
                                                 args.batches or (1, 8, 32), args.programs_per_sm):
        hq, hkv, d = SHAPES[shape]
        decode.PROGRAMS_PER_SM = pps  # read when the workspace picks its chunk count
        s = Setup(hq, hkv, d, ctx, bs)
        s.plant(0.0)
        dense = {}
        for name, make in (("flashinfer", flashinfer_step), ("triton", triton_dense_step)):
            try:
                dense[name] = bench(make(s))
            except Exception as e:  # a baseline that cannot run here is reported, not hidden
                print(f"{name} failed: {e!r}", flush=True)
        dense_us = min(dense.values())
        dense_bytes = bs * ctx * hkv * 2 * d * 2
        for budget in args.budgets:
            s.plant(budget)
            fn = s.ours(args.top_p, max_budget=args.max_budget)
            t = bench(fn)
            kept = s.ws.kept_tokens(bs).sum().item()
            real_budget = kept / (bs * hkv * ctx)
            t_graph = graph_time(fn)
            t_score = bench(stages(s, args.top_p, warps=())["score"])
            code_bytes = bs * hkv * ctx * (d // 8 + 4 + 4)  # codes, factor, req_to_token
            logit_bytes = bs * hq * ctx * 2  # fp16 logits: written by the score pass, read to select
            score_bytes = code_bytes + logit_bytes
            our_bytes = score_bytes + logit_bytes + kept * 2 * d * 2
            row = dict(shape=shape, q_heads=hq, kv_heads=hkv, head_dim=d, context=ctx, batch=bs,
                       programs_per_sm=decode.programs_per_sm(bs, hkv), num_chunks=s.ws.num_chunks(bs), target_budget=budget,
                       budget=real_budget, top_p=args.top_p, max_budget=args.max_budget,
                       flashinfer_us=dense.get("flashinfer"), triton_us=dense.get("triton"),
                       dense_us=dense_us, rabitq_us=t, rabitq_graph_us=t_graph,
                       speedup=dense_us / t, speedup_graph=dense_us / t_graph,
                       score_us=t_score, score_gbps=score_bytes / (t_score / 1e6) / 1e9,
                       gbps=our_bytes / (t / 1e6) / 1e9, dense_gbps=dense_bytes / (dense_us / 1e6) / 1e9)
            row["score_bw_fraction"] = row["score_gbps"] / bw
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del s
        torch.cuda.empty_cache()
    meta = _meta(bw)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = args.out.replace(".json", ".md")
    with open(md, "w") as f:
        f.write(f"# Decode attention, one layer: RaBitQ vs dense\n\n{meta['gpu']}, torch {meta['torch']}, triton "
                f"{meta['triton']}, sglang {meta['sglang']}, flashinfer {meta.get('flashinfer')}, {meta['date']}. "
                f"Copy bandwidth {bw:.0f} GB/s. Command: `{meta['command']}`\n\n"
                "| shape | context | batch | chunks | budget | flashinfer us | triton us | rabitq us | graph us | speedup | score GB/s (% of copy) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['num_chunks']} | {r['budget']:.3f} | {r['flashinfer_us'] or float('nan'):.1f} | "
                    f"{r['triton_us'] or float('nan'):.1f} | {r['rabitq_us']:.1f} | {r['rabitq_graph_us']:.1f} | "
                    f"{r['speedup_graph']:.2f}x | {r['score_gbps']:.0f} ({100 * r['score_bw_fraction']:.0f}%) |\n")
    print("wrote", args.out, md)


if __name__ == "__main__":
    main()
