"""Side by side: several ``eval/fidelity.py`` runs of one combination (e.g. top-p scopes).

    python eval/fidelity_compare.py eval/results/fidelity-scope/{scored,context,context-untempered} \
        --out eval/results/fidelity-scope.md

Per run: every (p, temperature) of its calibration grid with the true mass kept and the K/V budget,
and the budget each run needs for a given mean retained mass, read off its frontier (the points no
other point of the run beats on both, linearly interpolated): runs compared at equal accuracy rather
than at equal p.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MASSES = (0.93, 0.95, 0.96, 0.97, 0.98, 0.99)  # retained-mass levels the frontier is read at


def load(run: Path) -> dict:
    return json.loads((run / "fidelity.json").read_text())


def label(res: dict) -> str:
    """Centring and top-p scope of a run (the rest of its combination is in the header)."""
    cfg = res["config"]
    scope = cfg.get("top_p_scope", "scored")
    untempered = scope == "context" and not cfg.get("prior_tempered", True)
    return f"centring {res['recommended']['centring']}, {scope}" + (" (untempered sink/window)" if untempered else "")


def frontier_budget(points: list[dict], mass: float) -> float | None:
    """K/V budget at mean retained ``mass`` on the run's (budget, mass) frontier; None outside it."""
    pts = sorted((p["overall"]["kv_budget_mean"], p["overall"]["retained_mean"]) for p in points)
    front = []
    for budget, kept in pts:  # by budget: keep the points that keep more than every cheaper one
        if not front or kept > front[-1][1]:
            front.append((budget, kept))
    for (b0, m0), (b1, m1) in zip(front, front[1:]):
        if m0 <= mass <= m1:
            return b0 + (mass - m0) / (m1 - m0) * (b1 - b0)
    return None


def render(runs: list[Path]) -> str:
    results = [load(r) for r in runs]
    first = results[0]
    lines = [
        "# Top-p variants on real attention, side by side",
        "",
        f"Command: `python eval/fidelity_compare.py {' '.join(str(r) for r in runs)}`. Model {first['model']['name']}, "
        f"{first['config']['tokens_used']} tokens, rounding/selection/sink-window {first['recommended']['rounding']}/"
        f"{first['recommended']['selection']}/{first['recommended']['sink_window']}; "
        "each run's own command and date are in its fidelity.md. Layers >= 2, ~6K tokens of context.",
        "",
        "## K/V budget needed for a mean retained true mass (on each run's frontier)",
        "",
        "| run | " + " | ".join(f"mass {m}" for m in MASSES) + " |",
        "| --- | " + " | ".join("---" for _ in MASSES) + " |",
    ]
    for res in results:
        cells = [frontier_budget(res["calibration"], m) for m in MASSES]
        lines.append(f"| {label(res)} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += ["", "## Every (p, temperature)", "",
              "| run | p | temperature | retained mean | retained p5 | kv budget | ideal kv | out err p95 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in results:
        for p in res["calibration"]:
            o = p["overall"]
            lines.append(f"| {label(res)} | {p['top_p']} | {p['temperature']} | {o['retained_mean']:.3f} | "
                         f"{o['retained_p5']:.3f} | {o['kv_budget_mean']:.3f} | {o['ideal_kv_budget_mean']:.3f} | "
                         f"{o['out_err_p95']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="folders holding a fidelity.json each")
    ap.add_argument("--out", type=Path, help="markdown file (default: print)")
    args = ap.parse_args(argv)
    text = render(args.runs)
    if args.out:
        args.out.write_text(text)
        print("wrote", args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
