"""The cheapest rabitq configuration of an accuracy run that keeps dense's score at one context.

    python eval/operating_point.py eval/results/accuracy.json --context 32768 --max-drop 1

Prints ``TOP_P TEMPERATURE`` (``-`` for the server's default temperature) of the configuration with the
lowest average budget whose average score over the tasks is at most ``--max-drop`` points below dense's;
where none is, the one closest to dense (then the cheapest), with a note on stderr. ``gpu_suite.sh``
runs the speed benchmark there (``SPEED_AT=accuracy``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.accuracy import config_key, mean_score_budget  # noqa: E402


def averages(rows: list[dict], context: int) -> dict:
    """Per configuration ``(backend, top_p, score_temperature)``: (mean score over tasks, mean budget)."""
    groups: dict = {}
    for r in rows:
        if int(r["context"]) == context:
            groups.setdefault(config_key(r), []).append(r)
    return {key: mean_score_budget(rs) for key, rs in groups.items()}


def pick(rows: list[dict], context: int, max_drop: float) -> tuple[tuple, float, bool]:
    """(configuration, its drop from dense in points, whether it is within ``max_drop``)."""
    avg = averages(rows, context)
    dense = [score for (backend, _, _), (score, _) in avg.items() if backend == "dense"]
    if len(dense) != 1:
        raise ValueError(f"need exactly one dense configuration at context {context}, found {len(dense)}")
    ours = {k: (dense[0] - score, budget) for k, (score, budget) in avg.items() if k[0] != "dense"}
    if not ours:
        raise ValueError(f"no rabitq configuration at context {context}")
    within = [k for k, (drop, _) in ours.items() if drop <= max_drop]

    def cost(k):  # an unknown budget last
        return ours[k][1] is None, ours[k][1] or 0.0

    best = min(within, key=cost) if within else min(ours, key=lambda k: (ours[k][0], *cost(k)))
    return best, ours[best][0], bool(within)


def main(argv=None) -> tuple:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("accuracy", help="accuracy.json of eval/accuracy.py")
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--max-drop", type=float, default=1.0, help="points below dense's average score")
    args = ap.parse_args(argv)
    with open(args.accuracy) as f:
        rows = json.load(f)["rows"]
    (_, top_p, temp), drop, ok = pick(rows, args.context, args.max_drop)
    if not ok:
        print(f"[operating_point] no configuration within {args.max_drop} points of dense at {args.context}; "
              f"closest: p={top_p} t={temp} ({drop:+.1f} points)", file=sys.stderr)
    print(top_p, "-" if temp is None else temp)
    return top_p, temp


if __name__ == "__main__":
    main()
