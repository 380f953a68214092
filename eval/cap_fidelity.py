"""True attention mass kept by top-p alone and by top-p with ``--rabitq-max-budget``, on a real model (CPU).

    python eval/cap_fidelity.py --model qwen15 --out eval/results/cap_fidelity-qwen15.json

Runs the model once over the fidelity study's generated text (``eval/fidelity.py``: documents, code,
tables, facts restated later), captures post-RoPE q and k of every layer, and at sampled decode
positions runs the backend's own reference selection (``reference.rabitq_decode``: codes centred on the
mean of the first ``--calib`` keys, INT4 query, histogram top-p, the union cap) for each setting. Per
(position, query head) it measures the true attention mass (exact softmax over every key) on the tokens
the head's kv-head attends, and per (position, kv-head) the K/V budget (attended / context). The
question it answers: at about the same budget, does a cap on a higher p keep more true mass than a
lower p? Layers >= ``--dense-layers`` only (the first ones attend densely in the backend).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import fidelity as F  # noqa: E402
from eval import server as S  # noqa: E402
from sglang_rabitq.reference import encode_keys, random_rotation, rabitq_decode  # noqa: E402

# (top-p, score temperature, max budget): the measured operating points and caps between them
SETTINGS = [(0.8, 1.0, 1.0), (0.9, 1.0, 1.0), (0.9, 0.6, 1.0), (0.9, 1.0, 0.1), (0.9, 1.0, 0.15),
            (0.9, 0.6, 0.1), (0.9, 0.6, 0.15), (0.9, 0.6, 0.2), (1.0, 1.0, 0.1), (1.0, 1.0, 0.2)]


def layer_samples(q, k, positions, settings, sink, window, calib, seed, layer):
    """Per setting: retained true mass per (position, query head) and K/V budget per (position, kv-head)."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    group, scale = hq // hkv, d**-0.5
    rot = random_rotation(d, seed=seed * 1000 + layer, num_heads=hkv)
    center = k[:calib].mean(0)
    codes, factor = encode_keys(k, rot, center)
    n = k.shape[0]
    req_to_token = torch.arange(n, dtype=torch.int32)[None]
    out = {s: {"retained": [], "budget": []} for s in settings}
    for t in positions:
        length = t + 1
        logits = torch.einsum("hd,nhd->hn", q[t].double(), k[:length].double().repeat_interleave(group, dim=1)) * scale
        w = torch.softmax(logits, -1)
        for s in settings:
            top_p, temp, cap = s
            _, attended = rabitq_decode(
                q[t : t + 1], k, k, codes, factor, rot, req_to_token, torch.tensor([0]), torch.tensor([length]),
                torch.tensor([length]), top_p=top_p, sink=sink, window=window, sm_scale=scale,
                score_temperature=temp, center=center, max_budget=cap)
            for h, slots in enumerate(attended[0]):
                heads = slice(h * group, (h + 1) * group)
                out[s]["retained"] += w[heads][:, slots.long()].sum(-1).tolist()
                out[s]["budget"].append(len(slots) / length)
    return out


def summarize(values: list[float]) -> dict:
    x = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(x.mean()), "p5": float(torch.quantile(x, 0.05)), "n": len(values)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen15", help="HF folder, or a name known to eval/fetch_model.py")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--positions", type=int, default=12, help="decode positions, in the last half of the text")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--calib", type=int, default=512, help="keys the centre is the mean of")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(S.RESULTS / "cap_fidelity.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok, info = F.load_model(args.model)
    cfg = F.StudyConfig(tokens=args.tokens, seed=args.seed)
    ids = F.encode_text(tok, cfg)
    qkv = F.dump_qkv(model, ids)
    del model
    n = qkv["q"].shape[1]
    positions = F._positions(n // 2, n, args.positions, args.seed)
    layers = list(range(args.dense_layers, qkv["q"].shape[0]))
    pooled = {s: {"retained": [], "budget": []} for s in SETTINGS}
    for layer in layers:
        got = layer_samples(qkv["q"][layer], qkv["k"][layer], positions, SETTINGS, args.sink, args.window,
                            args.calib, args.seed, layer)
        for s in SETTINGS:
            for key in ("retained", "budget"):
                pooled[s][key] += got[s][key]
        print(f"[cap_fidelity] layer {layer} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [{"top_p": s[0], "score_temperature": s[1], "max_budget": s[2],
             "retained": summarize(pooled[s]["retained"]), "kv_budget": summarize(pooled[s]["budget"])}
            for s in SETTINGS]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "model": info["name"], "tokens": n, "positions": positions, "layers": layers,
        "sink": args.sink, "window": args.window, "calib": args.calib, "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    S.write_json(args.out, result)
    print(f"\n{'p':>5}{'t':>5}{'cap':>6}{'retained':>10}{'p5':>7}{'kv budget':>11}")
    for r in rows:
        print(f"{r['top_p']:>5}{r['score_temperature']:>5}{r['max_budget']:>6}{r['retained']['mean']:>10.3f}"
              f"{r['retained']['p5']:>7.3f}{r['kv_budget']['mean']:>11.3f}")
    return result


if __name__ == "__main__":
    main()
