"""End to end on a GPU with a real model: dense flashinfer vs rabitq servers (eval/e2e_smoke.py).
Skipped without CUDA or without RABITQ_TEST_MODEL (a model folder, e.g. SmolLM2-135M-Instruct)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = os.environ.get("RABITQ_TEST_MODEL")


@pytest.mark.gpu
@pytest.mark.skipif(not MODEL, reason="set RABITQ_TEST_MODEL to a model folder")
def test_e2e_smoke_against_dense(tmp_path):
    out = tmp_path / "e2e_smoke.json"
    script = Path(__file__).resolve().parent.parent / "eval" / "e2e_smoke.py"
    subprocess.run([sys.executable, str(script), "--model", MODEL, "--out", str(out)], check=True, timeout=1800)
    result = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["passed"]]
    assert result["total"] >= 7 and not failed, failed
