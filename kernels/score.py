"""Score pass: per chunk of a request's scored region and kv-head, the estimated logits of every
query head of the group (written to the workspace in fp16, for the attention pass to select from),
their max and a histogram of token counts per bin (reference: ``hist_threshold``'s per-row
statistics, over the fp16 logits).

Bins have width ``BIN_WIDTH`` on an absolute grid counted down from the chunk's top bin
``floor(max / BIN_WIDTH)``, so chunks combine by shifting. The codes are read once: the
histogram pass re-reads the chunk's own fp16 logits (from L2) once the max is known. Groups of up
to ``HEADS_AT_ONCE_FROM`` heads count them by warp ballots (``kernels.histogram``): score launch 187 ->
169 us, step 1.03-1.04x on the Llama-3.1-8B shape (ab_step-ballot-kv-major-h100.md); larger groups, which
count all heads of a block together, measured slower with ballots (ab_step-ballot-hist.md).
No full-precision K is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.kernels.estimate_mma import MMA, MMA_ROUNDS, mma_chunk_logits
from sglang_rabitq.kernels.estimate import (
    HW_POPCOUNT,
    block_logits,
    chunk_bounds,
    compiled_for,
    group_pad,
    logit_constants,
    logit_rows,
    offsets_fit_32,
    slot_offsets,
    table_entries,
    table_words,
)
from sglang_rabitq.kernels.histogram import BALLOT, ballot_counts, counts_by_key, key_masks
from sglang_rabitq.kernels.launch_chain import chain_options, chain_start
from sglang_rabitq.reference.codes import key_bits_of
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS

NO_BIN = tl.constexpr(-(2**30))  # top bin of a chunk with no tokens
SCORE_BLOCK_N = 128  # tokens per inner block of the estimate
HIST_BLOCK_N = 512  # logits per inner block of the histogram
# groups of more query heads than this histogram all heads of a block together (their loads in
# flight at once, 26 % fewer instructions per head in the SASS): score pass 4-18 % faster on the
# Qwen2.5 shapes (6-7 heads), but 1-5 % slower on the Llama shape (4 heads) at batch 16
# (ab_step-merge-hist-ungated.md), which keeps one head at a time (ab_step-merge-hist.md)
HEADS_AT_ONCE_FROM = tl.constexpr(4)


def score_max_registers(group: int) -> int:
    """Register cap of a score program. Uncapped, the Llama-3.1-8B shape (4 x 128, 2 warps) ran at 168
    registers, 12 resident warps per SM, while the estimate loop stalls on L1 (Nsight Compute on an
    H200: 0.7 eligible warps per scheduler, issue slots 44 % busy). At 128 nothing spills up to 7
    heads a group; 8 heads spill at 128 (36-108 B) and not at 160. Decode step 1.00-1.20x on the four
    shapes measured, none slower (ab_step-score-maxnreg.md, H100); a cap of 96 was mixed. (Measured with
    the bit-plane estimate; the nibble-table estimate compiles to 143 registers uncapped at 4 x 128.)
    Groups of up to 4 heads, whose ballot histograms took the program to 114 registers (8 programs of 2
    warps per SM), get 96 (10 programs), no spills at groups 1-4, D 64 and 128: score launch 178 -> 167 us
    at 32K and 672 -> 614 at 128K on the Llama-3.1-8B shape at batch 32, equal at batches 4-8 (H100,
    kernels_breakdown-regs-chunks-h100.md); caps of 80 and 64 no better."""
    if group <= 4:
        return 96
    return 128 if group <= 7 else 160


def score_num_warps(group: int, head_dim: int) -> int:
    """Warps per score program. A [group_pad, 128] tile of D-bit estimates on 2 warps needs ~254
    registers per thread at 8 x 128 (Qwen2.5-1.5B: 12/2 heads, D 128), 4 programs per SM; on 4 warps
    128, twice the warps per SM: 116 vs 133 us at 32K, batch 32 on an H200 (kernels_breakdown-qwen15.md).
    At 4 x 128 (Llama-3.1-8B) and 8 x 64 (Qwen2.5-0.5B) the two are within 2 %, 2 warps ahead.
    With the nibble-table estimate, 4 warps at 4 x 128 measured 0.95x (ab_step-score-4warps.md)."""
    return 4 if group_pad(group) * head_dim >= 1024 else 2


# The next block's slots load beside this block's code words (both estimates): the gather slot -> code
# word waits on memory once a block, not twice. Tensor cores, Llama-3.1-8B shape, 32K, H100
# (kernels_breakdown-ahead-h100.md): score launch 244 -> 229 us on 4 warps, 239 -> 241 on 2, at batch 32;
# 18.7 -> 17.5 us at batch 1; loading two blocks ahead was no better
SLOTS_AHEAD = True

# The tensor cores' estimate where it measured faster than the nibble table (kernels_breakdown-mma-h100.md,
# 32K, batch 32, score launch): D 128 -16 % (Llama-3.1-8B shape, 295 -> 247 us) and -10 % (Qwen2.5-1.5B,
# 95 -> 85 us); at D 64 (Qwen2.5-0.5B) +9 % (78 -> 85 us): half of each 128-bit MMA row is padding there
MMA_MIN_HEAD_DIM = 128


SM80 = (8, 0)  # mma .b1 .and.popc, redux.sync: sm_80 on


def mma_estimate(device: torch.device) -> bool:
    """Whether the score pass estimates on the tensor cores: compiled (not interpreted) on sm_80 or newer."""
    return MMA and compiled_for(device, SM80)


def ballot_histogram(device: torch.device) -> bool:
    """Whether the score pass may count by warp ballots: compiled (not interpreted) on sm_80 or newer."""
    return BALLOT and compiled_for(device, SM80)


@triton.jit
def bin_below(lg, top, BIN_W: tl.constexpr):
    """The bin of each stored logit ``lg``, counted down from bin ``top`` (0 = the top bin)."""
    return top - tl.floor(lg.to(tl.float32) / BIN_W).to(tl.int32)


@triton.jit
def bin_counts(k, valid, NB: tl.constexpr):
    """``[NB]`` counts of the valid bins ``k`` in ``[0, NB)`` (``tl.histogram``)."""
    return tl.histogram(k, NB, mask=valid & (k >= 0) & (k < NB))


@triton.jit(do_not_specialize=["NC"])  # per-batch sizes: one compile (package doc)
def _score_kernel(
    table_ptr, qscal_ptr, codes_ptr, factor_ptr, r2t_ptr, plan_ptr, logit_ptr,
    cmax_ptr, ctop_ptr, ccount_ptr,
    sm_scale, stride_cn, stride_ch, stride_fn, stride_fh, stride_r2t, HQ, NC,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, HBLOCK: tl.constexpr,
    NB: tl.constexpr, BIN_W: tl.constexpr, PLAN_FIELDS: tl.constexpr, WPE: tl.constexpr, HW: tl.constexpr,
    MMA: tl.constexpr, W: tl.constexpr, R: tl.constexpr, AHEAD: tl.constexpr, BALLOT_HIST: tl.constexpr,
    OFFS32: tl.constexpr, KEY_BITS: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    c = tl.program_id(2)
    offs_g = tl.arange(0, GP)
    gmask = offs_g < GROUP
    heads = hkv * GROUP + offs_g
    qrows = b * HQ + heads
    start, end = chunk_bounds(plan_ptr, b, c, PLAN_FIELDS)
    rpi = tl.load(plan_ptr + b * PLAN_FIELDS + 0).to(tl.int64)
    rows = logit_rows(plan_ptr, b, heads, HQ, NC, PLAN_FIELDS)
    table = table_entries(table_ptr, b, hkv, HQ // GROUP, D, WPE)
    # this kv-head's codes and factors: the per-token offsets from here on are slot_offsets
    codes_kv = codes_ptr + hkv.to(tl.int64) * stride_ch
    factor_kv = factor_ptr + hkv.to(tl.int64) * stride_fh
    if MMA:
        head_row = NC * tl.load(plan_ptr + b * PLAN_FIELDS + 3)  # logits of one head: NC chunks
        logit_base = logit_ptr + logit_rows(plan_ptr, b, hkv * GROUP, HQ, NC, PLAN_FIELDS)
        m = mma_chunk_logits(codes_kv, factor_kv, r2t_ptr + rpi * stride_r2t, logit_base, head_row, qscal_ptr, table,
                             start, end, b, hkv, HQ, stride_cn, stride_fn, sm_scale, GROUP, GP, D, W, R, AHEAD, OFFS32,
                             KEY_BITS)
    else:
        k_dot, k_ones, k_0 = logit_constants(qscal_ptr, qrows, gmask, sm_scale, D, KEY_BITS)
        # running max per (head, column), reduced across columns once after the loop
        col_max = tl.full((GP, BLOCK_N), float("-inf"), tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        if AHEAD:
            slots_next = tl.load(r2t_ptr + rpi * stride_r2t + start + offs_n, mask=start + offs_n < end, other=0)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            valid = pos < end
            if AHEAD:
                slots = slot_offsets(slots_next, OFFS32)
                slots_next = tl.load(r2t_ptr + rpi * stride_r2t + pos + BLOCK_N, mask=pos + BLOCK_N < end, other=0)
            else:
                slots = slot_offsets(tl.load(r2t_ptr + rpi * stride_r2t + pos, mask=valid, other=0), OFFS32)
            lg = block_logits(codes_kv, factor_kv, slots, valid, stride_cn, stride_fn,
                              table, offs_g, k_dot, k_ones, k_0, D, BLOCK_N, HW, KEY_BITS)
            lg = lg.to(tl.float16)  # the stored value is the one selected on: bin and max follow it
            tl.store(logit_ptr + rows[:, None] + pos[None, :], lg, mask=gmask[:, None] & valid[None, :])
            col_max = tl.maximum(col_max, lg.to(tl.float32))
        m = tl.max(col_max, axis=1)
    # m stays -inf for an empty chunk: skipped later
    top = tl.where(m > float("-inf"), tl.floor(m / BIN_W), 0.0).to(tl.int32)
    out_rows = qrows * NC + c
    tl.store(cmax_ptr + out_rows, m, mask=gmask)
    tl.store(ctop_ptr + out_rows, tl.where(m > float("-inf"), top, NO_BIN), mask=gmask)
    tl.debug_barrier()  # this program's logit stores are visible to all its threads
    offs_j = tl.arange(0, NB)
    count = tl.zeros((GP, NB), tl.int32)
    # a thread's VEC consecutive logits load as one vector, all or none: rows and chunks start at
    # whole CHUNK_ALIGN blocks, so such a group is aligned, and one that starts before the chunk's
    # end lies inside the workspace (what lies past the end is loaded, never counted)
    VEC: tl.constexpr = min(8, HBLOCK // (32 * W))
    offs_h = tl.arange(0, HBLOCK)
    lead = offs_h // VEC * VEC
    if GROUP > HEADS_AT_ONCE_FROM:
        for n0 in range(start, end, HBLOCK):
            valid = n0 + offs_h < end
            # every head's block is requested before the first histogram: one memory round trip per
            # block, not one per head (the histograms synchronize the warps, which keeps loads behind them)
            blocks = ()
            for g in tl.static_range(GROUP):
                base = tl.multiple_of(tl.sum(tl.where(offs_g == g, rows, 0), axis=0) + n0, VEC)
                blocks = blocks + (tl.load(logit_ptr + base + offs_h, mask=lead < end - n0, other=0.0,
                                           cache_modifier=".cg"),)
            for g in tl.static_range(GROUP):
                top_g = tl.sum(tl.where(offs_g == g, top, 0), axis=0)
                k = bin_below(blocks[g], top_g, BIN_W)
                count = tl.where(offs_g[:, None] == g, count + bin_counts(k, valid, NB)[None, :], count)
    else:  # one head at a time; each block's logits load while the block before is counted (the
        # next block of the head or the first of the next head), so the walk waits on memory once
        nblk = tl.cdiv(end - start, HBLOCK)
        row_next = tl.sum(tl.where(offs_g == 0, rows, 0), axis=0)
        lg = tl.load(logit_ptr + tl.multiple_of(row_next + start, VEC) + offs_h, mask=lead < end - start, other=0.0,
                     cache_modifier=".cg")
        key_bits = key_masks(offs_h // VEC)
        for g in tl.static_range(GROUP):
            top_g = tl.sum(tl.where(offs_g == g, top, 0), axis=0)
            row_g = row_next
            row_next = tl.sum(tl.where(offs_g == g + 1, rows, 0), axis=0)
            count_g = tl.zeros((NB,), tl.int32)
            by_key = tl.zeros((HBLOCK,), tl.int32)  # the ballots' counts, per element's key
            keys_ok = tl.full((HBLOCK,), -1, tl.int32)
            for j in range(0, nblk):
                this = lg
                last = j + 1 == nblk
                # scalars, so that the load stays one vector a thread
                nstart = tl.where(last, start, start + (j + 1) * HBLOCK)
                nrow = tl.where(last, row_next, row_g)
                nend = tl.where(last & (g + 1 == GROUP), start, end)
                lg = tl.load(logit_ptr + tl.multiple_of(nrow + nstart, VEC) + offs_h, mask=lead < nend - nstart,
                             other=0.0, cache_modifier=".cg")
                k = bin_below(this, top_g, BIN_W)
                pos = start + j * HBLOCK + offs_h
                if BALLOT_HIST:
                    part, seen = ballot_counts(tl.where(pos < end, k, -1), *key_bits)
                    by_key += part
                    keys_ok &= seen
                else:
                    count_g += bin_counts(k, pos < end, NB)
            if BALLOT_HIST:
                tl.static_assert(NB == 64, "the ballot histogram counts 64 bins")
                count_g = counts_by_key(by_key, HBLOCK, VEC)
                if tl.min((keys_ok == -1).to(tl.int32), axis=0) == 0:  # not the layout assumed: count again
                    count_g = tl.zeros((NB,), tl.int32)
                    for n0 in range(start, end, HBLOCK):
                        pos = n0 + offs_h
                        k = bin_below(tl.load(logit_ptr + row_g + pos, mask=pos < end, other=0.0), top_g, BIN_W)
                        count_g += bin_counts(k, pos < end, NB)
            count = tl.where(offs_g[:, None] == g, count_g[None, :], count)
    tl.store(ccount_ptr + (qrows[:, None] * NC + c) * NB + offs_j[None, :], count, mask=gmask[:, None] & (end > start))


def score_chunks(
    qtable: torch.Tensor, qscal: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor,
    req_to_token: torch.Tensor, plan: torch.Tensor, logits: torch.Tensor, stats: "ChunkStats",
    sm_scale: float, num_kv_heads: int, num_chunks: int, num_warps: int | None = None, mma: bool | None = None,
    mma_rounds: int = MMA_ROUNDS, slots_ahead: bool = SLOTS_AHEAD, ballot: bool = True,
    max_registers: int | None = None,
) -> None:
    """Fill ``logits`` (fp16, laid out per ``logit_rows``) and ``stats`` for every (request, query
    head, chunk) of the plan's scored regions. ``num_warps``: default ``score_num_warps``; ``mma``:
    the estimate on the tensor cores (``kernels.estimate_mma``), default where the GPU has them and
    D >= ``MMA_MIN_HEAD_DIM`` (one MMA per bit-plane of the codes);
    ``mma_rounds``: 16-token tiles per warp an iteration there; ``slots_ahead``: each block's slots load
    with the block before (``SLOTS_AHEAD``); ``ballot``: groups of
    up to ``HEADS_AT_ONCE_FROM`` heads count their histograms by warp ballots (``kernels.histogram``)
    where compiled, else with ``tl.histogram``; ``max_registers``: default ``score_max_registers``."""
    bsz, hq = qscal.shape[:2]
    d = qtable.shape[2] * 4
    group = hq // num_kv_heads
    nc = num_chunks
    if not (qtable.is_contiguous() and qscal.is_contiguous()):
        raise ValueError("qtable and qscal must be contiguous")
    if tuple(qtable.shape[1:]) != (num_kv_heads, d // 4, 16, table_words(group)):
        raise ValueError(f"qtable {tuple(qtable.shape)} is not a query_nibble_table of {hq}/{num_kv_heads} heads")
    if bsz * hq * nc > stats.capacity:
        raise ValueError(f"chunk statistics hold {stats.capacity} rows, need {bsz * hq * nc}")
    bits = key_bits_of(codes, d)
    use_mma = (d >= MMA_MIN_HEAD_DIM and mma_estimate(codes.device)) if mma is None else mma
    warps = num_warps or score_num_warps(group, d)
    _score_kernel[(bsz, num_kv_heads, nc)](
        qtable, qscal, codes, factor, req_to_token, plan, logits,
        stats.max, stats.top, stats.count,
        sm_scale, codes.stride(0), codes.stride(1), factor.stride(0), factor.stride(1), req_to_token.stride(0), hq, nc,
        GROUP=group, GP=group_pad(group), D=d, BLOCK_N=SCORE_BLOCK_N, HBLOCK=HIST_BLOCK_N,
        NB=HIST_BINS, BIN_W=BIN_WIDTH, PLAN_FIELDS=plan.shape[1], WPE=table_words(group), HW=HW_POPCOUNT,
        MMA=use_mma, W=warps, R=mma_rounds, AHEAD=slots_ahead,
        BALLOT_HIST=ballot and ballot_histogram(codes.device), OFFS32=offsets_fit_32(codes, factor), KEY_BITS=bits,
        num_warps=warps,
        maxnreg=max_registers or score_max_registers(group), **chain_options(codes.device),
    )


class ChunkStats:
    """Per (request, query head, chunk) statistics of the score pass (flat, CUDA-graph stable)."""

    def __init__(self, capacity: int, device):
        n = self.capacity = capacity  # >= batch * query heads * chunks of any call
        self.max = torch.empty(n, dtype=torch.float32, device=device)
        self.top = torch.empty(n, dtype=torch.int32, device=device)
        self.count = torch.empty(n, HIST_BINS, dtype=torch.int32, device=device)
