"""eval/ab_step.py: each tree's own kernels run (an edit in the base tree shows in its output), and
identical trees give identical outputs. On CPU under the interpreter (conftest sets it; not timed)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAST_LINE = "\n    return out\n"  # the end of rabitq_decode_layer


def copy_tree(dst: Path) -> Path:
    for name in ("sglang_rabitq", "kernels"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def run_ab(base: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "eval/ab_step.py"), "--base", str(base), "--shapes", "4x2x64",
           "--contexts", "512", "--batches", "2", "--budgets", "0.1", "--out", str(out), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT)  # the environment, TRITON_INTERPRET included, is inherited
    return json.loads(out.read_text())


def test_a_copy_of_this_tree_gives_identical_outputs(tmp_path):
    base = copy_tree(tmp_path / "base")
    result = run_ab(base, tmp_path / "ab.json")
    assert Path(result["base"]).is_relative_to(base) and Path(result["head"]) == ROOT / "kernels"
    (row,) = result["rows"]
    assert row["identical"] and row["max_abs_diff"] == 0.0
    assert row["base_budget"] == row["head_budget"] > 0
    assert (tmp_path / "ab.md").read_text().count("| 4x2x64 | 512 | 2 |") == 1


def test_the_base_tree_runs_its_own_kernels(tmp_path):
    base = copy_tree(tmp_path / "base")
    decode = base / "kernels/decode.py"
    src = decode.read_text()
    assert src.endswith(LAST_LINE)
    decode.write_text(src.removesuffix(LAST_LINE) + "\n    out.mul_(2)" + LAST_LINE)
    (row,) = run_ab(base, tmp_path / "ab.json")["rows"]
    assert not row["identical"] and row["max_abs_diff"] > 0


def test_max_budget_caps_what_both_trees_read(tmp_path):
    # random keys, none planted: top-p 0.9 keeps most of the 384 scored tokens; the cap keeps ~10 % of
    # them (plus the 128 sink and window tokens of the 512, which every step reads)
    base = copy_tree(tmp_path / "base")
    (row,) = run_ab(base, tmp_path / "ab.json", "--budgets", "0", "--max-budget", "0.1")["rows"]
    assert row["identical"]
    assert row["base_budget"] == row["head_budget"] < (128 + 0.2 * 384) / 512


def test_each_side_runs_its_own_key_bits(tmp_path):
    """``--head-key-bits 3``: the head side's step runs on 3-bit codes (a buffer of 3 bit-planes, which
    the kernels read their bits from), the base side's on 1-bit ones; the result says which."""
    result = run_ab(ROOT, tmp_path / "ab.json", "--head-key-bits", "3")
    assert (result["base_key_bits"], result["head_key_bits"]) == (1, 3)
    (row,) = result["rows"]
    assert row["base_budget"] > 0 and row["head_budget"] > 0
    assert "head key codes: 3 bits per dimension" in (tmp_path / "ab.md").read_text()
