"""One RaBitQ decode step of one layer on the device: plan buffers, workspace and the launch
sequence (reference: ``sglang_rabitq.reference.rabitq_decode``).

Host-side planning happens once per batch (``DecodePlan.fill``, torch ops only, no host sync);
every launch reads lengths from device memory and has a grid fixed by the batch size, so a whole
decode step can be captured in a CUDA graph and replayed with a data-dependent budget.
"""

from __future__ import annotations

import torch
import triton

from sglang_rabitq.kernels.encode import encode_slots
from sglang_rabitq.kernels.estimate import table_words
from sglang_rabitq.kernels.query import prepare_query, query_heads_per_program
from sglang_rabitq.kernels.score import SCORE_BLOCK_N, ChunkStats, score_chunks
from sglang_rabitq.kernels.select import cap_union, top_p_threshold
from sglang_rabitq.kernels.sparse_attention import merge_partials, sparse_attention
from sglang_rabitq.reference.decode import TOP_P_SCOPES
from sglang_rabitq.reference.plan import plan_rows
from sglang_rabitq.reference.select import HIST_BINS, LOGIT_STORAGE_DTYPE
from sglang_rabitq.validation import check_choice

CHUNK_ALIGN = SCORE_BLOCK_N  # chunk lengths are whole blocks of both kernels
# the sparse path's per-token workspace holds this many tokens per KV-pool slot: room for requests
# that share prefixes (their contexts count once per request); beyond it, requests attend densely
WORKSPACE_TOKENS_PER_SLOT = 2
# a fixed target of programs per SM for every batch (bench_kernels.py --programs-per-sm); None: the
# rule of programs_per_sm
PROGRAMS_PER_SM: int | None = None
# a fixed launch configuration of the attention kernel (bench_kernels.py --attention-configs); None:
# sparse_attention.attention_launch's
ATTENTION_LAUNCH: dict | None = None
LARGE_BATCH_PAIRS = 256  # (request, kv-head) pairs of a batch bucket from which programs_per_sm doubles


def programs_per_sm(bsz: int, num_kv_heads: int) -> int:
    """Programs per SM the chunks aim at. Many short programs hide the latency of the gathers (slot ->
    code -> K/V) better than few long ones: 16. From ``LARGE_BATCH_PAIRS`` (request, kv-head) pairs on,
    where each chunk would still hold thousands of tokens, 32: on the Llama-3.1-8B shape at batch 32 the
    step took 442 / 782 / 1514 us at 32K / 64K / 128K against 450 / 827 / 1628 at 16 (H100,
    kernels_breakdown-regs-chunks-h100.md), while at batches 4-8 (32-64 pairs) 32 was as fast or slower
    (32K batch 4: 121 vs 90 us), as on the Qwen2.5 shapes (2 kv-heads) at batch 16 (chunk_sweep-kv-major-h100.md)."""
    if PROGRAMS_PER_SM is not None:
        return PROGRAMS_PER_SM
    return 32 if triton.next_power_of_2(bsz) * num_kv_heads >= LARGE_BATCH_PAIRS else 16


def chunks_for_batch(bsz: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Chunks per (request, kv-head): ``programs_per_sm`` programs per SM, none shorter than 2 blocks.

    A function of the batch size's power-of-two bucket: a CUDA graph replays a batch padded up
    to a captured size (SGLang captures every power of two), and the same chunks, hence the same
    floating-point sums, give the same output with graphs on and off.
    """
    want = triton.cdiv(programs_per_sm(bsz, num_kv_heads) * num_sms, triton.next_power_of_2(bsz) * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_context, 2 * CHUNK_ALIGN)))


INDEX_DTYPE = torch.int32  # the workspace's compacted slot numbers


def workspace_bytes_per_slot(num_q_heads: int, num_kv_heads: int) -> int:
    """Bytes of the per-token workspace (a logit per query head, an index per kv-head) per KV-pool slot."""
    return WORKSPACE_TOKENS_PER_SLOT * (LOGIT_STORAGE_DTYPE.itemsize * num_q_heads + INDEX_DTYPE.itemsize * num_kv_heads)


class DecodePlan:
    """Per request of a decode batch (int32 rows): req pool index, sink end S', scored-region
    end E, chunk length, sequence length L, and ``work``: where the request's rows start in the
    workspace's per-token buffers (see ``reference.decode_regions`` for S' and E).

    A request whose rows would pass the workspace's ``capacity`` (tokens) is planned with an
    empty scored region: it attends densely, correct and slower. Serving fills the rows with
    ``kernels.plan.plan_decode`` (``DecodePlanner``); ``fill`` is the torch path for tests and benchmarks.
    """

    FIELDS = 6

    def __init__(self, max_bs: int, capacity: int, device):
        self.rows = torch.zeros(max_bs, self.FIELDS, dtype=torch.int32, device=device)
        self.capacity = capacity
        # of the last plan: (requests planned dense for want of workspace, slots marked for encoding)
        self.totals = torch.zeros(2, dtype=torch.int64, device=device)

    @property
    def overflow(self) -> torch.Tensor:
        return self.totals[0]

    def fill(
        self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, encoded_lens: torch.Tensor,
        sink: int, window: int, num_chunks: int,
    ) -> torch.Tensor:
        rows, overflow = plan_rows(req_pool_indices, seq_lens, encoded_lens, sink, window, num_chunks,
                                   CHUNK_ALIGN, self.capacity)
        self.totals.copy_(torch.tensor([overflow, 0]))
        out = self.rows[: rows.shape[0]]
        out.copy_(rows)
        return out


class DecodeWorkspace:
    """Scratch buffers of the decode kernels, sized once for the largest batch (CUDA-graph stable)."""

    def __init__(self, max_bs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 max_context: int, device, num_sms: int | None = None, max_tokens: int | None = None):
        """``max_tokens``: total context of a batch the sparse path holds (default ``max_bs *
        max_context``, always enough); requests beyond it attend densely (``DecodePlan``)."""
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 8
        self.num_q_heads, self.num_kv_heads, self.max_context, self.num_sms = num_q_heads, num_kv_heads, max_context, num_sms
        most = max(b * chunks_for_batch(b, num_kv_heads, max_context, num_sms) for b in range(1, max_bs + 1))
        parts = most + max_bs  # + one sink/window program per request
        # chunk rows are whole CHUNK_ALIGN blocks: at most that much padding per chunk
        capacity = (max_bs * max_context if max_tokens is None else max_tokens) + most * CHUNK_ALIGN
        f32 = dict(dtype=torch.float32, device=device)
        self.plan = DecodePlan(max_bs, capacity, device)
        self.qscal = torch.empty(max_bs, num_q_heads, 3, **f32)
        # zeros: the bytes of no query head (groups not a multiple of 4) are never written
        group = num_q_heads // num_kv_heads
        self.qtable = torch.zeros(max_bs, num_kv_heads, head_dim // 4, 16, table_words(group), dtype=torch.int32, device=device)
        self.logits = torch.empty(capacity * num_q_heads, dtype=LOGIT_STORAGE_DTYPE, device=device)
        self.index = torch.empty(capacity * num_kv_heads, dtype=INDEX_DTYPE, device=device)
        self.thr = torch.empty(max_bs, num_q_heads, **f32)
        self.prior = torch.empty(max_bs, num_q_heads, **f32)  # log-mass of each head's sink + window
        self.zero_center = torch.zeros(num_kv_heads, head_dim, **f32)  # a constant: the centre when none is given
        self.stats = ChunkStats(most * num_q_heads, device)
        self.head_max = torch.empty(max_bs, num_q_heads, **f32)  # for --rabitq-max-budget
        self.union_count = torch.empty(most * num_kv_heads, HIST_BINS, dtype=torch.int32, device=device)
        self.partial_out = torch.empty(parts * num_q_heads, head_dim, **f32)
        self.partial_lse = torch.empty(parts * num_q_heads, **f32)
        self.kept = torch.zeros(parts * num_kv_heads, dtype=torch.int32, device=device)
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)

    def num_chunks(self, bsz: int) -> int:
        return chunks_for_batch(bsz, self.num_kv_heads, self.max_context, self.num_sms)

    def nbytes(self) -> int:
        tensors = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        tensors += [self.plan.rows, self.plan.totals, self.stats.max, self.stats.top, self.stats.count]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kept_tokens(self, bsz: int) -> torch.Tensor:
        """Tokens attended per (request, kv-head) by the last launch: ``[B, Hkv]``."""
        nc = self.num_chunks(bsz)
        return self.kept[: bsz * self.num_kv_heads * (nc + 1)].view(bsz, self.num_kv_heads, nc + 1).sum(-1)


def rabitq_decode_layer(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor,
    rot: torch.Tensor, req_to_token: torch.Tensor, ws: DecodeWorkspace, out: torch.Tensor,
    *, sm_scale: float, top_p: float, dense: bool = False, rounding: str = "nearest", score_temperature: float = 1.0,
    top_p_scope: str = "scored", center: torch.Tensor | None = None, pending: torch.Tensor | None = None,
    max_budget: float = 1.0,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` for the batch planned in ``ws.plan``; writes ``out [B, Hq, D]``.

    Selection ranks tokens by the estimated logits times ``score_temperature`` (< 1 flattens the
    estimated softmax, which the estimator's noise makes look sharper than the true one); the
    attention itself uses ``sm_scale``. ``top_p_scope`` and ``center`` (the codes' key centre,
    ``[Hkv, D]``; None: zero) as in ``reference.rabitq_decode``. ``pending [B * chunk]``: this step's
    lazy-encode slots (``prepare_query``; -1 for none), encoded into ``codes`` and ``factor`` on the way.
    ``max_budget``: each kv-head attends at most about this fraction of its scored tokens (``cap_union``).
    """
    check_choice("top_p_scope", top_p_scope, TOP_P_SCOPES)
    bsz, hq, _ = q.shape
    nc = ws.num_chunks(bsz)
    plan = ws.plan.rows[:bsz]
    qscal, qtable, thr = ws.qscal[:bsz], ws.qtable[:bsz], ws.thr[:bsz]
    center = ws.zero_center if center is None else center
    if dense:
        if pending is not None:
            encode_slots(k_buf, pending, rot, center, codes, factor)
    else:
        score_scale = sm_scale * score_temperature
        prior = ws.prior[:bsz] if top_p_scope == "context" else None
        prepare_query(q, rot, qscal, qtable, ws.seed, rounding, prior_lse=prior, k_buf=k_buf, req_to_token=req_to_token,
                      plan=plan, center=center, prior_scale=score_scale, pending=pending, codes=codes, factor=factor,
                      heads_per_program=query_heads_per_program(bsz, hq, k_buf.shape[1], ws.num_sms))
        score_chunks(qtable, qscal, codes, factor, req_to_token, plan, ws.logits, ws.stats,
                     score_scale, k_buf.shape[1], nc)
        capped = max_budget < 1.0
        head_max = ws.head_max[:bsz] if capped else None
        top_p_threshold(ws.stats, thr, top_p, nc, prior, head_max)
        if capped:
            cap_union(ws.logits, plan, thr, head_max, ws.union_count, max_budget, k_buf.shape[1], nc)
    sparse_attention(q, k_buf, v_buf, ws.logits, ws.index, req_to_token, plan, thr,
                     ws.partial_out, ws.partial_lse, ws.kept, sm_scale, nc, dense, **(ATTENTION_LAUNCH or {}))
    merge_partials(ws.partial_out, ws.partial_lse, out, nc + 1)
    return out
