"""Exact decode attention over an explicit token set (fp32 math, GQA)."""

from __future__ import annotations

import torch


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One decode token: ``q [Hq, D]`` against ``k, v [N, Hkv, D]``; returns ``[Hq, D]`` float32."""
    hq, hkv = q.shape[0], k.shape[1]
    kk = k.to(torch.float32).repeat_interleave(hq // hkv, dim=1)  # [N, Hq, D]
    vv = v.to(torch.float32).repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.to(torch.float32), kk) * sm_scale
    return torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), vv)


def sparse_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots_per_kv_head: list[torch.Tensor],
    sm_scale: float,
) -> torch.Tensor:
    """Exact attention of ``q [Hq, D]`` over, for each kv-head, its own set of KV-pool slots."""
    hq, hkv = q.shape[0], len(slots_per_kv_head)
    group = hq // hkv
    out = torch.empty(hq, q.shape[1], dtype=torch.float32, device=q.device)
    for h in range(hkv):
        slots = slots_per_kv_head[h].to(k_buf.device)
        heads = slice(h * group, (h + 1) * group)
        out[heads] = dense_decode_attention(
            q[heads], k_buf[slots, h : h + 1], v_buf[slots, h : h + 1], sm_scale
        )
    return out
