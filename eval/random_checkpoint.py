"""A Llama-family checkpoint of random weights at a trained model's scale, for speed runs of a shape
whose weights cannot be staged (Llama-3.1-8B).

    python eval/random_checkpoint.py --dummy llama8b --out /tmp/rabitq-random-models/llama8b

SGLang's ``--load-format dummy`` fills weights uniformly in +-1e-3; at that scale every attention logit
is below fp16's resolution (``dummy_logit_scale.json``), so all estimates of a head tie and no threshold
can keep fewer than all tokens. Here every matrix is drawn from N(0, ``initializer_range``) (the
config's own init scale, 0.02 for Llama) and every norm weight is 1, so q and k have unit-order entries
and logits spread over a few units: a budget can then be set (``--rabitq-max-budget``) and its speed
measured. Attention over random weights says nothing about which tokens matter: speed only.
Files: config.json and one safetensors shard per layer (HF names), loaded by SGLang's default loader.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def llama_shapes(cfg: dict) -> dict[str, list[dict[str, tuple[int, ...]]]]:
    """HF parameter names and shapes of a Llama config, grouped by shard: embeddings, each layer, head."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shards = {"embed": [{"model.embed_tokens.weight": (vocab, h)}]}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layers.append({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    shards["layers"] = layers
    head = {"model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        head["lm_head.weight"] = (vocab, h)
    shards["head"] = [head]
    return shards


def random_tensor(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """A norm weight (1-D) is ones; a matrix is N(0, std) from ``gen``."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    return (torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std).to(dtype)


def write_random_checkpoint(folder: str | Path, cfg: dict, seed: int = 0, device: str | None = None) -> Path:
    """Write config.json and random shards into ``folder`` (skipped when its index is already there)."""
    from safetensors.torch import save_file

    if cfg.get("model_type") != "llama":
        raise ValueError(f"random checkpoints are written for Llama configs only, got {cfg.get('model_type')!r}")
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("config") == cfg:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.get("torch_dtype", "bfloat16"))
    std = float(cfg.get("initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = llama_shapes(cfg)
    groups = shards["embed"] + shards["layers"] + shards["head"]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: random_tensor(n, s, std, gen, dtype, device).cpu() for n, s in group.items()}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    # written last: its presence says the shards are complete (and for which config)
    index_path.write_text(json.dumps({"metadata": {"seed": seed, "std": std}, "config": cfg, "weight_map": weight_map}))
    return folder


def main(argv=None) -> Path:
    from eval.bench_decode import DUMMY

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dummy", choices=sorted(DUMMY), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folder = write_random_checkpoint(args.out, DUMMY[args.dummy][1], args.seed)
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
