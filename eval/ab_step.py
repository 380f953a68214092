"""A/B of one layer's decode step between two source trees of this package, on one GPU in one run:
both trees' kernels run the same seeded inputs (CUDA-graph replay), and their outputs are compared.

    git archive HEAD~1 sglang_rabitq kernels | (mkdir -p /tmp/ab-base && tar -x -C /tmp/ab-base)
    python eval/ab_step.py --base /tmp/ab-base --shapes qwen2.5-0.5b --contexts 16384 --batches 1,4,16

``--head`` defaults to this checkout. A tree needs only ``sglang_rabitq/`` and ``kernels/``: each runs
in a subprocess of its own that imports ``sglang_rabitq`` from ``TREE/sglang_rabitq`` and
``sglang_rabitq.kernels`` from ``TREE/kernels`` (the installed layout), so neither sees the other's
kernels. A shape is a name of ``decode_step.SHAPES`` or ``QxKVxD`` (query heads, kv-heads, head_dim).
Without a GPU the step runs under Triton's interpreter and is compared but not timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from eval import server as S  # noqa: E402


def use_tree(tree: Path) -> str:
    """Make ``import sglang_rabitq`` load ``tree``'s sources; returns the kernels package's path."""
    # an editable install of this checkout answers imports of the package through its own finder
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
    for name, path in (("sglang_rabitq", tree / "sglang_rabitq"), ("sglang_rabitq.kernels", tree / "kernels")):
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    import sglang_rabitq.kernels.decode as decode

    if not Path(decode.__file__).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{decode.__file__} is not from {tree}")
    return str(Path(decode.__file__).resolve().parent)


def parse_shape(text: str) -> tuple[int, int, int]:
    from eval.decode_step import SHAPES

    if text in SHAPES:
        return SHAPES[text]
    try:
        hq, hkv, d = (int(x) for x in text.split("x"))
    except ValueError:
        raise SystemExit(f"shape {text!r}: a name of {', '.join(SHAPES)} or QxKVxD") from None
    return hq, hkv, d


def configs(args) -> list[dict]:
    return [dict(shape=shape, context=ctx, batch=bs, target_budget=budget, max_budget=args.max_budget)
            for shape in args.shapes for ctx in args.contexts for bs in args.batches for budget in args.budgets]


def worker(tree: Path, cfgs: list[dict], top_p: float, out: Path, per_kernel: bool = False) -> None:
    """Run (and on a GPU time) every config with ``tree``'s kernels; save rows and outputs to ``out``.
    ``per_kernel``: also each kernel's device time in the replay (``decode_step.kernel_times``)."""
    kernels_dir = use_tree(tree)
    import torch

    from eval.decode_step import Setup, graph_time, kernel_times

    cuda = torch.cuda.is_available()
    rows, outputs = [], []
    for cfg in cfgs:
        hq, hkv, d = parse_shape(cfg["shape"])
        s = Setup(hq, hkv, d, cfg["context"], cfg["batch"], device="cuda" if cuda else "cpu",
                  key_bits=cfg.get("key_bits", 1))
        s.plant(cfg["target_budget"])
        step = s.ours(top_p, max_budget=cfg["max_budget"])
        step()
        outputs.append(s.out.float().cpu().clone())
        rows.append(dict(cfg, budget=s.budget(), us=graph_time(step) if cuda else None))
        if cuda and per_kernel:
            rows[-1]["kernel_us"] = kernel_times(step)
        print(json.dumps(rows[-1]), flush=True)
        del s, step
        if cuda:
            torch.cuda.empty_cache()
    torch.save({"rows": rows, "outputs": outputs, "kernels": kernels_dir}, out)


def run_tree(tree: Path, cfgs: list[dict], top_p: float, out: Path, per_kernel: bool = False) -> dict:
    import torch

    cmd = [sys.executable, __file__, "--worker", str(tree), "--configs", json.dumps(cfgs), "--top-p", str(top_p),
           "--worker-out", str(out)] + (["--per-kernel"] if per_kernel else [])
    print(f"[ab] {tree}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return torch.load(out)


def compare(base: dict, head: dict) -> list[dict]:
    import torch

    rows = []
    for b, h, ob, oh in zip(base["rows"], head["rows"], base["outputs"], head["outputs"]):
        row = {k: h[k] for k in ("shape", "context", "batch", "target_budget")}
        row.update(base_budget=b["budget"], head_budget=h["budget"], base_us=b["us"], head_us=h["us"],
                   speedup=b["us"] / h["us"] if b["us"] and h["us"] else None,
                   max_abs_diff=(ob - oh).abs().max().item(), identical=torch.equal(ob, oh))
        if "kernel_us" in b:
            row.update(base_kernel_us=b["kernel_us"], head_kernel_us=h["kernel_us"])
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Decode step A/B (one layer, CUDA-graph replay, us)", "",
             f"{result['gpu']}, {result['date']}. Command: `{result['command']}`", "",
             f"base: `{result['base']}`; head: `{result['head']}`"
             + "".join(f"; {side} key codes: {result.get(f'{side}_key_bits', 1)} bits per dimension"
                       for side in ("base", "head") if result.get(f"{side}_key_bits", 1) != 1), "",
             "| shape | context | batch | budget base / head | base us | head us | speedup | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        us = [("-" if r[k] is None else f"{r[k]:.1f}") for k in ("base_us", "head_us")]
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {r['base_budget']:.3f} / {r['head_budget']:.3f} "
                     f"| {us[0]} | {us[1]} | {sp} | {r['max_abs_diff']:.3g} |")
    timed = [r for r in result["rows"] if "base_kernel_us" in r]
    if timed:
        lines += ["", "Per kernel, device us per replay (profiler records; `gaps`: the replay's span minus its kernels), base / head:", "",
                  "| shape | context | batch | kernel | base | head |", "|---|---|---|---|---|---|"]
        for r in timed:
            names = list(dict.fromkeys([*r["base_kernel_us"], *r["head_kernel_us"]]))
            for name in names:
                cells = [("-" if name not in r[k] else f"{r[k][name]:.1f}") for k in ("base_kernel_us", "head_kernel_us")]
                lines.append(f"| {r['shape']} | {r['context']} | {r['batch']} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="source tree to compare against (needs sglang_rabitq/ and kernels/)")
    ap.add_argument("--head", type=Path, default=ROOT)
    ap.add_argument("--shapes", type=S.csv_list(), default=["qwen2.5-0.5b", "qwen2.5-1.5b"])
    ap.add_argument("--contexts", type=S.csv_list(int), default=[16384])
    ap.add_argument("--batches", type=S.csv_list(int), default=[1, 4, 16])
    ap.add_argument("--budgets", type=S.csv_list(float), default=[0.3])
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-budget", type=float, default=1.0, help="the cap on each kv-head's union (--rabitq-max-budget)")
    ap.add_argument("--base-key-bits", type=int, default=1, help="bits per dimension of the base side's key codes")
    ap.add_argument("--head-key-bits", type=int, default=1, help="bits per dimension of the head side's key codes")
    ap.add_argument("--out", type=Path, default=ROOT / "eval/results/ab_step.json")
    ap.add_argument("--per-kernel", action="store_true", help="also each kernel's device time (GPU only)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--configs", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, json.loads(args.configs), args.top_p, args.worker_out, args.per_kernel)
    if args.base is None:
        ap.error("--base is required")
    for tree in (args.base, args.head):
        if not ((tree / "sglang_rabitq").is_dir() and (tree / "kernels").is_dir()):
            ap.error(f"{tree} has no sglang_rabitq/ and kernels/")
    cfgs = configs(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for side, tree, bits in (("base", args.base, args.base_key_bits), ("head", args.head, args.head_key_bits)):
        scratch = args.out.with_suffix(f".{side}.pt")
        side_cfgs = [dict(c, key_bits=bits) for c in cfgs] if bits != 1 else cfgs
        runs[side] = run_tree(tree, side_cfgs, args.top_p, scratch, args.per_kernel)
        scratch.unlink()
    result = {**S.env_info(), "base": runs["base"]["kernels"], "head": runs["head"]["kernels"], "top_p": args.top_p,
              "base_key_bits": args.base_key_bits, "head_key_bits": args.head_key_bits,
              "rows": compare(runs["base"], runs["head"])}
    S.write_json(args.out, result)
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
