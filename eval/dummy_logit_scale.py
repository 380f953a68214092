"""How large are attention logits under SGLang's dummy weights (``--load-format dummy``)? CPU only.

    python eval/dummy_logit_scale.py --out eval/results/dummy_logit_scale.json
    python eval/dummy_logit_scale.py --init normal --out eval/results/dummy_logit_scale-normal.json

Builds the first layer's path to q and k at the Llama-3.1-8B shape (an embedding of 1024 of its rows, the
input RMSNorm, q and k projections), fills every weight with SGLang's own ``initialize_dummy_weights``
(uniform in +-1e-3), and reports the largest scaled logit ``|q.k| / sqrt(D)`` and the largest bound
``|q||k| / sqrt(D)`` (which also bounds any estimate of it) against fp16's smallest subnormal: below it,
every logit the kernels store is the same fp16 value, so a threshold keeps every token (RoPE is left out:
a rotation changes no norm). ``--init normal``: the weights of ``eval/random_checkpoint.py`` instead
(N(0, 0.02) matrices, unit norm weights), which the Llama-shape speed runs load to get a settable budget.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import server as S  # noqa: E402

HIDDEN, HEAD_DIM, Q_HEADS, KV_HEADS, EPS = 4096, 128, 32, 8, 1e-5  # Llama-3.1-8B


class FirstLayerQK(torch.nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.embed = torch.nn.Embedding(rows, HIDDEN)
        self.norm = torch.nn.Parameter(torch.empty(HIDDEN))
        self.q_proj = torch.nn.Linear(HIDDEN, Q_HEADS * HEAD_DIM, bias=False)
        self.k_proj = torch.nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * self.norm
        return self.q_proj(h).view(-1, Q_HEADS, HEAD_DIM), self.k_proj(h).view(-1, KV_HEADS, HEAD_DIM)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--init", choices=["sglang", "normal"], default="sglang",
                    help="sglang: initialize_dummy_weights; normal: random_checkpoint.random_tensor")
    ap.add_argument("--out", default=str(S.RESULTS / "dummy_logit_scale.json"))
    args = ap.parse_args(argv)
    model = FirstLayerQK(1024).to(torch.bfloat16)
    if args.init == "sglang":
        from sglang.srt.model_loader.weight_utils import initialize_dummy_weights

        initialize_dummy_weights(model)
    else:
        from eval.random_checkpoint import random_tensor

        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(random_tensor(name, tuple(param.shape), 0.02, gen, param.dtype, "cpu"))
    ids = torch.randint(0, 1024, (args.tokens,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k = (t.float() for t in model(ids))
    scale = HEAD_DIM**-0.5
    group = Q_HEADS // KV_HEADS
    logits = torch.einsum("hd,thd->ht", q[-1], k.repeat_interleave(group, dim=1)) * scale
    bound = q[-1].norm(dim=-1)[:, None] * k.repeat_interleave(group, dim=1).norm(dim=-1).T * scale
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch": torch.__version__,
        "init": args.init,
        "tokens": args.tokens,
        "max_abs_logit": float(logits.abs().max()),
        "max_norm_bound": float(bound.max()),
        "logit_std_per_head_mean": float(logits.std(dim=-1).mean()),
        "fp16_smallest_subnormal": float(torch.finfo(torch.float16).smallest_normal * 2**-10),
        "distinct_fp16_logits_per_head_max": int(max(row.half().unique().numel() for row in logits)),
    }
    S.write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
