"""Error of the RaBitQ inner-product estimate over random rotations, against the RaBitQ bound.

    python eval/estimator_stats.py --out eval/results/estimator_stats.json

Errors are in cosine units, (estimate - <q, k>) / (|q| |k|), for a fixed (q, k) pair at several
cosines, each over many seeded random rotations; "none" is the unquantized query, "nearest" and
"random" the two INT4 roundings.
"""

import argparse
import datetime
import json
import math
import sys

import torch

from sglang_rabitq.reference.estimator_stats import estimator_errors, rabitq_error_bound


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--out", default="eval/results/estimator_stats.json")
    args = ap.parse_args()
    rows = []
    for dim in (64, 128):
        for cosine in (0.0, 0.3, 0.6, 0.9):
            for rounding in ("none", "nearest", "random"):
                err = estimator_errors(dim, cosine, rounding, args.trials, seed=dim * 10 + int(cosine * 10))
                bound = rabitq_error_bound(dim, cosine)
                row = dict(dim=dim, cosine=cosine, rounding=rounding, trials=args.trials,
                           mean=float(err.mean()), mean_stderr=float(err.std()) / math.sqrt(args.trials),
                           std=float(err.std()), bound_std=bound, std_over_bound=float(err.std()) / bound)
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, device="cpu",
                command=" ".join(["python"] + sys.argv))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
