"""Decode planning in plain torch: the ground truth of ``sglang_rabitq.kernels.plan``.

``plan_rows`` lays out a decode batch (see ``kernels.decode.DecodePlan`` for the fields);
``plan_decode`` adds what a real decode step changes in the code pool: the slot each request's
new token takes loses its code, and a request whose unencoded tail reaches ``window + chunk``
tokens gets its oldest ``chunk`` tail tokens listed for encoding (and counted as encoded).
"""

from __future__ import annotations

import torch


def plan_rows(req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, encoded_lens: torch.Tensor, sink: int,
              window: int, num_chunks: int, align: int, capacity: int) -> tuple[torch.Tensor, int]:
    """``(rows [B, 6] int32, overflow)``: per request (req pool index, sink end S', scored end E,
    chunk length, L, workspace offset); requests whose rows pass ``capacity`` get S' = E = 0 (dense)."""
    length = seq_lens.to(torch.int32)
    sink_end = torch.clamp(length, max=sink)
    score_end = torch.maximum(sink_end, torch.minimum(encoded_lens.to(torch.int32), length - window))
    scored = score_end - sink_end
    per_chunk = torch.clamp((scored + num_chunks - 1) // num_chunks, min=1)
    chunk_len = (per_chunk + align - 1) // align * align
    row_len = torch.where(scored > 0, chunk_len * num_chunks, 0)
    end = torch.cumsum(row_len, 0, dtype=torch.int64)
    fits = end <= capacity
    sink_end = torch.where(fits, sink_end, 0)
    score_end = torch.where(fits, score_end, 0)
    work = torch.where(fits, end - row_len, 0).to(torch.int32)
    rows = torch.stack([req_pool_indices.to(torch.int32), sink_end, score_end, chunk_len, length, work], dim=1)
    return rows, int((~fits).sum())


def plan_decode(req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, req_to_token: torch.Tensor,
                encoded_len: torch.Tensor, valid: torch.Tensor, *, capacity: int, num_chunks: int, sink: int,
                window: int, chunk: int, align: int, mutate: bool) -> dict:
    """One decode batch's plan; with ``mutate`` updates ``valid`` and ``encoded_len`` in place.

    Rows with ``seq_len <= 1`` are CUDA-graph padding: planned, never mutate anything.
    Returns ``rows``, ``encode_slots [B * chunk]`` (int64, -1 = none), ``overflow``, ``encoded``.
    """
    bsz = req_pool_indices.shape[0]
    rpi = req_pool_indices.to(torch.int64)
    length = seq_lens.to(torch.int64)
    encoded = encoded_len[rpi].to(torch.int64)
    rows, overflow = plan_rows(rpi, length, encoded, sink, window, num_chunks, align, capacity)
    slots = torch.full((bsz, chunk), -1, dtype=torch.int64)
    count = torch.zeros(bsz, dtype=torch.int64)
    if mutate:
        cols = req_to_token.shape[1]
        for b in range(bsz):
            if length[b] <= 1:
                continue
            valid[int(req_to_token[rpi[b], min(int(length[b]) - 1, cols - 1)])] = False
            if length[b] - encoded[b] >= window + chunk:
                count[b] = chunk
                slots[b] = req_to_token[rpi[b], encoded[b] : encoded[b] + chunk].to(torch.int64)
                valid[slots[b]] = True
                encoded_len[rpi[b]] = int(encoded[b]) + chunk
    return {"rows": rows, "encode_slots": slots.view(-1), "overflow": overflow, "encoded": int(count.sum())}
