"""One RaBitQ decode step for a batch, end to end, in plain torch: the kernels' ground truth.

A request of length ``L`` whose first ``encoded`` positions have codes is split into
``sink = [0, S')``, ``scored = [S', E)`` and ``window = [E, L)`` with ``S' = min(S, L)`` and
``E = max(S', min(encoded, L - W))``: the window holds every not-yet-encoded token and at least the
last ``W``. Sink and window are always attended; from the scored region each query head keeps its
top-p set of estimated weights and a kv-head attends the union of its query heads' sets (with
``max_budget`` < 1, capped at about that fraction of its scored tokens: ``reference.select``).

``top_p_scope`` says of which mass ``p`` is taken: ``"context"`` (every token: the sink and
window's exact logits, centred and scaled like the estimates, count towards ``p``, so a head whose
mass sits in the sink selects little) or ``"scored"`` (the scored region's estimated mass alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_rabitq.reference.attention import sparse_decode_attention
from sglang_rabitq.reference.codes import estimate_int, quantize_query
from sglang_rabitq.reference.select import (
    LOGIT_STORAGE_DTYPE,
    hist_threshold,
    top_p_mask,
    union_cap_mask,
    union_cap_thresholds,
)
from sglang_rabitq.validation import check_choice

TOP_P_SCOPES = ("context", "scored")


@dataclass(frozen=True)
class DecodeRegions:
    sink_end: int  # S'
    score_end: int  # E
    length: int  # L


def decode_regions(length: int, encoded: int, sink: int, window: int) -> DecodeRegions:
    sink_end = min(sink, length)
    score_end = max(sink_end, min(encoded, length - window))
    return DecodeRegions(sink_end, score_end, length)


def dense_region_lse(
    q: torch.Tensor, keys: torch.Tensor, center: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``log sum exp(scale * <q, k - c>)`` over ``keys [N, D]`` for each query head of ``q [G, D]``:
    the always-attended tokens' mass, on the estimates' scale (they estimate ``<q, k - c>``)."""
    kc = keys.to(torch.float64) - (0.0 if center is None else center.to(torch.float64))
    return torch.logsumexp(q.to(torch.float64) @ kc.T * scale, dim=-1)


def select_union(logits: torch.Tensor, top_p: float, prior_lse: torch.Tensor | None, max_budget: float,
                 selector: str = "hist") -> torch.Tensor:
    """The tokens ``[N]`` (bool) a kv-head attends of its scored region, from its query heads'
    estimated logits ``[G, N]``: the union of their top-p sets, capped by ``max_budget``."""
    if selector == "exact":
        masks = top_p_mask(logits, top_p, prior_lse=prior_lse)
        return union_cap_mask(logits, masks, max_budget) if max_budget < 1.0 else masks.any(0)
    # the histogram's bins, and so the set, move when a logit crosses a bin edge: select from the
    # values the kernels select from
    x = logits.to(LOGIT_STORAGE_DTYPE).double()
    thr = hist_threshold(x, top_p, prior_lse=prior_lse)
    if max_budget < 1.0:
        thr = union_cap_thresholds(x, thr, max_budget)
    return ((x >= thr.to(x.device)[:, None]) & torch.isfinite(x)).any(0)


def rabitq_decode(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    codes: torch.Tensor,
    factor: torch.Tensor,
    rot: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    encoded_lens: torch.Tensor,
    *,
    top_p: float,
    sink: int,
    window: int,
    sm_scale: float,
    dense: bool = False,
    selector: str = "hist",
    score_temperature: float = 1.0,
    query: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    top_p_scope: str = "scored",
    center: torch.Tensor | None = None,
    max_budget: float = 1.0,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Returns ``out [B, Hq, D]`` float32 and, per request and kv-head, the attended slots (sorted).

    ``selector="hist"`` mirrors the kernels (histogram threshold over the logits rounded to the
    kernels' storage dtype); ``"exact"`` uses the minimal sort-based top-p set on full-precision logits.
    ``dense=True`` attends every token (the layers kept dense). Selection uses the estimated logits
    times ``score_temperature``; attention uses ``sm_scale``. ``query``: a given ``(q_u, delta, qmin)``
    in place of ``quantize_query(q, rot)`` (a kernel's rotation sums in another order, so a value on a
    rounding edge can take the other INT4 level, which moves every estimate a little).
    ``center [Hkv, D]``: the keys' centre the codes were encoded with (None: zero).
    ``max_budget``: a kv-head attends at most about this fraction of its scored tokens (``select``).
    """
    check_choice("top_p_scope", top_p_scope, TOP_P_SCOPES)
    check_choice("selector", selector, ("hist", "exact"))
    bsz, hq, d = q.shape
    hkv = k_buf.shape[1]
    group = hq // hkv
    q_u, delta, qmin = quantize_query(q, rot) if query is None else query
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    attended: list[list[torch.Tensor]] = []
    for b in range(bsz):
        length = int(seq_lens[b])
        reg = decode_regions(length, int(encoded_lens[b]), sink, window)
        row = req_to_token[int(req_pool_indices[b]), :length].to(torch.int64)
        scored = row[reg.sink_end : reg.score_end]
        always = torch.cat([row[: reg.sink_end], row[reg.score_end :]])
        per_head = []
        for h in range(hkv):
            if dense or scored.numel() == 0:
                chosen = scored
            else:
                heads = slice(h * group, (h + 1) * group)
                prior = None
                if top_p_scope == "context":
                    c = None if center is None else center[h]
                    prior = dense_region_lse(q[b, heads], k_buf[always, h], c,
                                             sm_scale * score_temperature)
                logits = torch.stack(
                    [
                        estimate_int(codes[scored, h], factor[scored, h], q_u[b, qh], delta[b, qh], qmin[b, qh])
                        * sm_scale
                        * score_temperature
                        for qh in range(h * group, (h + 1) * group)
                    ]
                )
                chosen = scored[select_union(logits, top_p, prior, max_budget, selector)]
            per_head.append(torch.sort(torch.cat([always, chosen])).values)
        out[b] = sparse_decode_attention(q[b], k_buf, v_buf, per_head, sm_scale)
        attended.append(per_head)
    return out, attended
