"""Merge accuracy.json, speed.json and prefix_sharing.json into summary.json, summary.md and two PNG plots.

    python eval/summary.py                                   # reads eval/results/*.json
    python eval/summary.py --speed eval/results/speed.json eval/results/speed_8b.json --out-dir eval/results

Missing inputs give empty sections. Plots need matplotlib (optional; skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.accuracy import config_key, config_name, config_order, mean_score_budget  # noqa: E402
from eval.server import RESULTS, flag_value, write_json  # noqa: E402
from sglang_rabitq.config import default_selection  # noqa: E402

PREFIX_KEYS = ("agreement", "codes_reused", "codes_encoded", "dense_tpot_ms", "rabitq_tpot_ms")


def _f(x):
    return None if x is None else float(x)


def _i(x):
    return None if x is None else int(round(x))


def _joined(sources: list[dict], key: str) -> str:
    """The distinct values of ``key`` over the input files, in order: results from several GPUs or
    models are merged, and the header must not name just one of them."""
    seen = list(dict.fromkeys(str(d[key]) for d in sources if d.get(key)))
    return ", ".join(seen) or "unknown"


def speed_model(result: dict, row: dict) -> str:
    """A speed row's model with what sets its budget: the prompts (where the run recorded them), the
    top-p, and a score temperature, budget cap, key bits or dense-batch threshold of 0 given in the run's
    rabitq flags."""
    cfg = result.get("config") or {}
    setting = [f"{result['prompts']} prompts"] if result.get("prompts") else []
    if cfg.get("top_p") is not None:
        setting.append(f"p {cfg['top_p']}")
    flags = cfg.get("rabitq_args") or ""
    temp = flag_value(flags, "--rabitq-score-temperature")
    if temp is not None:
        setting.append(f"t {temp}")
    cap = flag_value(flags, "--rabitq-max-budget")
    if cap is not None:
        setting.append(f"cap {cap}")
    bits = flag_value(flags, "--rabitq-key-bits")
    if bits is not None:
        setting.append(f"{bits}-bit keys")
    if flag_value(flags, "--rabitq-min-batch-context") == "0":
        setting.append("every step sparse")  # else batches of little total context attend densely
    return f"{row['model']} ({', '.join(setting)})" if setting else str(row["model"])


def _gpu(result: dict) -> str:
    return str(result.get("gpu") or "unknown")


def speed_key(row: dict) -> tuple:
    """A summary speed row's identity: the same model, context and batch measured on two GPUs are two rows."""
    return row["gpu"], row["model"], int(row["context"]), int(row["batch"])


def raw_speed_rows(speed: list[dict]) -> dict:
    """The drivers' speed rows (with their Amdahl limit and encode overhead) by ``speed_key``."""
    return {speed_key({**r, "gpu": _gpu(d), "model": speed_model(d, r)}): r for d in speed for r in d.get("rows", [])}


def accuracy_rows(accuracy: list[dict]) -> list[dict]:
    """The accuracy rows of all files; where two files scored the same (task, context, configuration),
    the one over more samples (on a tie the later file) stands: the drivers' samples are seeded per
    index, so the larger run holds the smaller one's samples."""
    kept: dict = {}
    for d in accuracy:
        for r in d.get("rows", []):
            ours = r["backend"] == "rabitq"
            row = {"task": str(r["task"]), "context": int(r["context"]), "backend": r["backend"],
                   "top_p": _f(r.get("top_p")) if ours else None,
                   "score_temperature": _f(r.get("score_temperature")) if ours else None,
                   "score": float(r["score"]), "budget": _f(r.get("budget")), "n": _i(r.get("n"))}
            key = (row["task"], row["context"], *config_key(row))
            if key not in kept or (row["n"] or 0) >= (kept[key]["n"] or 0):
                kept[key] = row
    return list(kept.values())


def config_label(c: tuple) -> str:
    return "dense" if c[0] == "dense" else "rabitq " + config_name(*c)


def build_summary(accuracy: list[dict], speed: list[dict], prefix: dict | None) -> dict:
    """The summary schema from loaded result files (each a dict as written by the drivers)."""
    sources = [d for d in [*accuracy, prefix or {}, *speed] if d]
    acc = accuracy_rows(accuracy)
    spd = [{"model": speed_model(d, r), "context": int(r["context"]), "batch": int(r["batch"]),
            "dense_tok_s": float(r["dense_tok_s"]), "rabitq_tok_s": float(r["rabitq_tok_s"]),
            "speedup": float(r["speedup"]), "budget": _f(r.get("budget")), "gpu": _gpu(d)}
           for d in speed for r in d.get("rows", [])]
    ps = (prefix or {}).get("summary") or {}
    return {
        "gpu": _joined(sources, "gpu"), "sglang": _joined(sources, "sglang"), "model": _joined(sources, "model"),
        "date": max((str(d["date"]) for d in sources if d.get("date")), default="unknown"),
        "accuracy": acc, "speed": spd,
        "prefix_sharing": {"agreement": _f(ps.get("agreement")), "codes_reused": _i(ps.get("codes_reused")),
                           "codes_encoded": _i(ps.get("codes_encoded")),
                           "dense_tpot_ms": _f(ps.get("dense_tpot_ms")), "rabitq_tpot_ms": _f(ps.get("rabitq_tpot_ms"))},
    }


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def accuracy_table(acc: list[dict]) -> list[str]:
    if not acc:
        return ["(no accuracy results)"]
    cols = sorted({config_key(r) for r in acc}, key=config_order)
    names = [config_label(c) for c in cols]
    counts = [sorted({r["n"] for r in acc if config_key(r) == c and r.get("n")}) for c in cols]
    if len({tuple(n) for n in counts}) > 1:  # runs of different sizes side by side: say which is which
        names = [f"{name} ({'-'.join(map(str, (n[0], n[-1]) if len(n) > 1 else n))}/task)" if n else name
                 for name, n in zip(names, counts)]
    lines = ["| task | context | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(cols)]
    keys = sorted({(r["task"], r["context"]) for r in acc}, key=lambda k: (k[1], k[0]))
    contexts = sorted({k[1] for k in keys})
    for ctx in contexts:
        for task in [t for t, c in keys if c == ctx] + ["**average**"]:
            cells = []
            for c in cols:
                rs = [r for r in acc if r["context"] == ctx and config_key(r) == c
                      and (task == "**average**" or r["task"] == task)]
                if not rs:
                    cells.append("-")
                    continue
                s, bud = mean_score_budget(rs)
                cells.append(f"{s:.1f}" + (f" ({100 * bud:.0f}%)" if bud is not None else ""))
            lines.append(f"| {task} | {ctx} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Score 0-100; in parentheses the decode budget (attended / context tokens). t: the score "
                 f"temperature, where a run set it (else the server's default: {default_selection(1)[1]} with 1-bit key codes, "
                 f"{default_selection(2)[1]} with more). Where two "
                 "runs scored the same configuration, the one over more samples is shown.")
    return lines


def speed_table(spd: list[dict], raw: dict) -> list[str]:
    if not spd:
        return ["(no speed results)"]
    lines = ["| GPU | model | context | batch | dense tok/s | rabitq tok/s | speedup | Amdahl limit | budget | encode ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in spd:
        x = raw.get(speed_key(r), {})
        lines.append(f"| {r['gpu']} | {r['model']} | {r['context']} | {r['batch']} | {r['dense_tok_s']:.0f} | "
                     f"{r['rabitq_tok_s']:.0f} | {r['speedup']:.2f} | {_fmt(x.get('amdahl_limit'))} | "
                     f"{_fmt(r['budget'], '{:.1%}')} | {_fmt(x.get('encode_overhead_ms'), '{:.1f}')} |")
    lines.append("")
    lines.append("Amdahl limit = dense TPOT at this context / dense TPOT at the reference context (1K), same batch.")
    return lines


def prefix_table(ps: dict, table: list) -> list[str]:
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(ps[k], '{}')} |" for k in PREFIX_KEYS]
    if table:
        lines += ["", "| metric | dense | rabitq |", "|---|---|---|"]
        for name, a, b in table:
            fa, fb = (_fmt(v, "{:.3f}" if isinstance(v, float) else "{}") for v in (a, b))
            lines.append(f"| {name} | {fa} | {fb} |")
    return lines


def to_markdown(summary: dict, raw_speed: dict, prefix_rows: list, accuracy_model: str = "") -> str:
    head = ["# RaBitQCache end-to-end results", "",
            f"GPU: {summary['gpu']} · SGLang {summary['sglang']} · model {summary['model']} · {summary['date']}", ""]
    acc_head = "## Accuracy (RULER-style tasks" + (f"; {accuracy_model})" if accuracy_model else ")")
    return "\n".join(head + [acc_head, ""] + accuracy_table(summary["accuracy"])
                     + ["", "![accuracy vs budget](accuracy_vs_budget.png)", "", "## Decode speed", ""]
                     + speed_table(summary["speed"], raw_speed)
                     + ["", "![speedup vs context](speedup_vs_context.png)", "", "## Prefix sharing", ""]
                     + prefix_table(summary["prefix_sharing"], prefix_rows)) + "\n"


# ------------------------------------------------------------------------------------------------- plots


def plot(summary: dict, raw_speed: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[summary] matplotlib not installed: no plots", flush=True)
        return []
    written = []
    acc = summary["accuracy"]
    if acc:
        contexts = sorted({r["context"] for r in acc})
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            for task in sorted({r["task"] for r in acc}) + ["average"]:
                rs = [r for r in acc if r["context"] == ctx and (task == "average" or r["task"] == task)]
                pts = {}
                for r in rs:
                    x = 1.0 if r["backend"] == "dense" else r["budget"]
                    if x is not None:
                        pts.setdefault(config_key(r), []).append((x, r["score"]))
                xy = sorted((sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v)) for v in pts.values())
                if xy:
                    ax.plot(*zip(*xy), marker="o", lw=2.5 if task == "average" else 1,
                            color="black" if task == "average" else None, label=task)
            ax.set_title(f"context {ctx}")
            ax.set_xlabel("budget (attended / context; dense = 1)")
            ax.set_ylabel("score")
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "accuracy_vs_budget.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    spd = summary["speed"]
    if spd:
        fig, ax = plt.subplots(figsize=(6, 4))
        for gpu, model, batch in sorted({(r["gpu"], r["model"], r["batch"]) for r in spd}):
            rs = sorted((r for r in spd if (r["gpu"], r["model"], r["batch"]) == (gpu, model, batch)),
                        key=lambda r: r["context"])
            line = ax.plot([r["context"] for r in rs], [r["speedup"] for r in rs], marker="o",
                           label=f"{model} b={batch}, {gpu}")[0]
            lim = [(r["context"], raw_speed.get(speed_key(r), {}).get("amdahl_limit")) for r in rs]
            lim = [(c, v) for c, v in lim if v is not None]
            if lim:
                ax.plot(*zip(*lim), ls="--", color=line.get_color(), alpha=0.6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("decode speedup rabitq / dense (dashed: Amdahl limit)")
        # below the axes: one entry per (GPU, model, batch) would cover the lines inside them
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.15))
        ax.grid(alpha=0.3)
        written.append(out_dir / "speedup_vs_context.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written


def _load(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def prefix_rows(prefix: dict | None) -> list:
    """The prefix-sharing table, rebuilt from the file's runs with the current rows (a file written
    before a row existed still has the data for it); the file's own table if it has no runs."""
    if not prefix:
        return []
    if prefix.get("runs"):
        from eval.prefix_sharing import table

        return table(prefix["runs"], prefix.get("agreement"))
    return prefix.get("table") or []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", nargs="*", default=[str(RESULTS / "accuracy.json")])
    ap.add_argument("--speed", nargs="*", default=[str(RESULTS / "speed.json")])
    ap.add_argument("--prefix", default=str(RESULTS / "prefix_sharing.json"))
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    accuracy = [d for d in map(_load, args.accuracy) if d]
    accuracy_model = _joined(accuracy, "model") if accuracy else ""
    if "," in accuracy_model:  # its rows carry no model: two models' scores would be averaged together
        ap.error(f"--accuracy files of one model only, got {accuracy_model}")
    speed = [d for d in map(_load, args.speed) if d]
    prefix = _load(args.prefix)
    summary = build_summary(accuracy, speed, prefix)
    raw_speed = raw_speed_rows(speed)
    out = Path(args.out_dir)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(to_markdown(summary, raw_speed, prefix_rows(prefix), accuracy_model))
    print(f"[eval] wrote {out / 'summary.md'}")
    for p in plot(summary, raw_speed, out):
        print(f"[eval] wrote {p}")
    return summary


if __name__ == "__main__":
    main()
