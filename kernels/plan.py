"""Decode planning in one launch (reference: ``sglang_rabitq.reference.plan.plan_decode``).

Before every decode step (and before every CUDA-graph replay) the backend needs, per request, the
plan row of ``DecodePlan`` and the slots of its lazy-encode chunk, and must update the code pool's
validity flags and encoded lengths. As ~70 small torch ops this cost ~1 ms of host time per step
and (through scalar assignments that copy from pageable host memory) two host syncs; here it is
one program that walks the batch in blocks, carrying the running workspace offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAN_BLOCK_B = 128  # requests per block of the walk
PLAN_WARPS = 4


@triton.jit(do_not_specialize=["bsz", "num_chunks"])  # per-batch sizes: one compile (package doc)
def _plan_kernel(
    rpi_ptr, seq_ptr, r2t_ptr, enc_ptr, valid_ptr, rows_ptr, slots_ptr, totals_ptr, seed_ptr,
    bsz, stride_r2t, cols, capacity, num_chunks, sink, window,
    CHUNK: tl.constexpr, CHUNK_P: tl.constexpr, ALIGN: tl.constexpr, BLOCK_B: tl.constexpr,
    PLAN_FIELDS: tl.constexpr, MUTATE: tl.constexpr,
):
    offs_j = tl.arange(0, CHUNK_P)
    zero = tl.sum(tl.zeros((BLOCK_B,), tl.int64), axis=0)  # an int64 scalar (loop-carried values keep their type)
    total = zero  # workspace tokens planned so far: the running offset
    overflow = zero
    encoded_total = zero
    for b0 in range(0, bsz, BLOCK_B):
        offs = b0 + tl.arange(0, BLOCK_B)
        live = offs < bsz
        rpi = tl.load(rpi_ptr + offs, mask=live, other=0).to(tl.int64)
        length = tl.load(seq_ptr + offs, mask=live, other=1).to(tl.int32)
        encoded = tl.load(enc_ptr + rpi, mask=live, other=0)
        # regions and chunking: as reference.plan.plan_rows
        sink_end = tl.minimum(length, sink)
        score_end = tl.maximum(sink_end, tl.minimum(encoded, length - window))
        scored = score_end - sink_end
        per_chunk = tl.maximum((scored + num_chunks - 1) // num_chunks, 1)
        chunk_len = (per_chunk + ALIGN - 1) // ALIGN * ALIGN
        row_len = tl.where(live & (scored > 0), chunk_len * num_chunks, 0).to(tl.int64)
        end = total + tl.cumsum(row_len, axis=0)
        fits = end <= capacity
        work = tl.where(fits, end - row_len, 0)
        row = rows_ptr + offs * PLAN_FIELDS
        tl.store(row + 0, rpi.to(tl.int32), mask=live)
        tl.store(row + 1, tl.where(fits, sink_end, 0), mask=live)
        tl.store(row + 2, tl.where(fits, score_end, 0), mask=live)
        tl.store(row + 3, chunk_len, mask=live)
        tl.store(row + 4, length, mask=live)
        tl.store(row + 5, work.to(tl.int32), mask=live)
        total += tl.sum(row_len, axis=0)
        overflow += tl.sum((live & ~fits).to(tl.int64), axis=0)
        slot_out = slots_ptr + offs[:, None] * CHUNK + offs_j[None, :]
        out_mask = live[:, None] & (offs_j < CHUNK)[None, :]
        if MUTATE:
            real = live & (length > 1)  # CUDA-graph padding rows carry seq_len 1
            # the token written this step takes a slot whose old code (if any) is stale
            new_pos = tl.minimum(tl.maximum(length - 1, 0), cols - 1)
            new_slot = tl.load(r2t_ptr + rpi * stride_r2t + new_pos, mask=real, other=0).to(tl.int64)
            tl.store(valid_ptr + new_slot, tl.zeros_like(new_slot).to(tl.int8), mask=real)
            # a chunk of window tokens is encoded once CHUNK of them are older than the window
            count = tl.where(real & (length - encoded >= window + CHUNK), CHUNK, 0)
            take = offs_j[None, :] < count[:, None]
            pos = tl.minimum(encoded[:, None] + offs_j[None, :], cols - 1)
            slots = tl.load(r2t_ptr + rpi[:, None] * stride_r2t + pos, mask=take, other=0).to(tl.int64)
            tl.store(slot_out, tl.where(take, slots, -1), mask=out_mask)
            tl.store(valid_ptr + slots, tl.full(slots.shape, 1, tl.int8), mask=take)
            tl.store(enc_ptr + rpi, encoded + count, mask=real)
            encoded_total += tl.sum(count.to(tl.int64), axis=0)
        else:
            tl.store(slot_out, tl.full((BLOCK_B, CHUNK_P), -1, tl.int64), mask=out_mask)
    tl.store(totals_ptr + 0, overflow)
    tl.store(totals_ptr + 1, encoded_total)
    if MUTATE:
        tl.store(seed_ptr, tl.load(seed_ptr) + 1)  # fresh noise for randomized query rounding


def plan_decode(
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, req_to_token: torch.Tensor,
    encoded_len: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor, encode_slots: torch.Tensor,
    totals: torch.Tensor, seed: torch.Tensor, *, capacity: int, num_chunks: int, sink: int, window: int,
    chunk: int, align: int, mutate: bool,
) -> None:
    """Fill ``rows [B, FIELDS]`` and ``encode_slots [B * chunk]`` (int64, -1 = none) and set
    ``totals [2]`` = (requests planned dense for want of workspace, slots marked for encoding).

    ``mutate`` also marks this step's new slots invalid and the chunk's slots valid, advances
    ``encoded_len`` and bumps ``seed``; without it (CUDA-graph capture) no pool state changes.
    """
    bsz = req_pool_indices.shape[0]
    if valid.dtype != torch.bool:
        raise ValueError("valid must be a bool tensor")
    _plan_kernel[(1,)](
        req_pool_indices, seq_lens, req_to_token, encoded_len, valid.view(torch.int8), rows, encode_slots, totals, seed,
        bsz, req_to_token.stride(0), req_to_token.shape[1], capacity, num_chunks, sink, window,
        **plan_constexprs(chunk, align, rows.shape[1], mutate), num_warps=PLAN_WARPS,
    )


def plan_constexprs(chunk: int, align: int, fields: int, mutate: bool) -> dict:
    """The plan kernel's compile-time arguments (``fields``: int32 fields per plan row)."""
    return dict(CHUNK=chunk, CHUNK_P=triton.next_power_of_2(chunk), ALIGN=align, BLOCK_B=PLAN_BLOCK_B,
                PLAN_FIELDS=fields, MUTATE=mutate)
