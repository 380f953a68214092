"""The score kernel's estimate loop, compiled for an H100 (sm_90) on this machine: it runs on the
hardware popcount and without shared-memory round trips (a layout conversion or barrier there costs
more than the estimate itself)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_score_estimate_loop_uses_hardware_popcount_without_barriers():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    out = subprocess.run([sys.executable, str(ROOT / "eval" / "kernel_sass.py"), "--kernel", "score", "--num-warps", "2",
                          "--top", "100"], env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    counts = []
    for line in out.splitlines():
        ops = dict(reversed(item.split()) for item in line.split(": ", 2)[2].split(", "))
        counts.append({op: int(n) for op, n in ops.items()})
    estimate = max(counts, key=lambda ops: ops.get("POPC", 0))
    # 8 (head, token) elements per thread at 2 warps: 4 words x 4 planes each, plus 4 words x 2 tokens
    assert estimate["POPC"] == 8 * 16 + 8
    assert not {"BAR", "STS", "LDS"} & estimate.keys()
