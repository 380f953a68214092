"""``--attention-backend rabitq``: dense prefill through SGLang's own kernels, RaBitQ sparse decode.

The backend object only plans metadata; the work is in ``sglang_rabitq.kernels``:
- extend / prefill / mixed batches: the dense backend attends and saves K/V; once the last sparse
  layer has, the keys of every new token, and of any reused prefix slot without a valid code, are
  encoded for all sparse layers in one launch;
- decode: a batch whose total context is below ``min_batch_context`` attends densely in every layer
  (the dense backend's kernel; with CUDA graphs, a graph variant of its own: ``patches/cuda_graph.py``),
  and its lazy refresh is one launch after the last layer, as at extend; otherwise each sparse layer
  runs query (with the lazy refresh: a chunk of older window tokens may be encoded) -> score ->
  threshold -> sparse attention over the slot-indexed codes. Layers that attend densely
  (the first ``dense_layers``, or all at top-p 1) use the dense backend's own decode kernel, so
  top-p 1 gives exactly the dense backend's output.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from sglang_rabitq.calibration import CenterCalibration
from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.config import RaBitQConfig
from sglang_rabitq.kernels import (
    DecodeWorkspace,
    encode_slots,
    encode_slots_all_layers,
    key_pointers,
    rabitq_decode_layer,
)
from sglang_rabitq.kernels.decode import WORKSPACE_TOKENS_PER_SLOT
from sglang_rabitq.model_check import check_runner
from sglang_rabitq.planner import DecodePlanner, plan_extend
from sglang_rabitq.request_budget import RequestBudgets
from sglang_rabitq.stats import RaBitQStats

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

logger = logging.getLogger("sglang_rabitq")
STEP_FIELDS = ("attended_tokens", "context_tokens", "decode_steps", "dense_steps")  # counted once per decode step


def _tp_rank_and_size(model_runner) -> tuple[int, int]:
    """This process's attention tensor-parallel rank and size (the KV pool holds its kv-heads only)."""
    from sglang.srt.runtime_context import get_parallel

    try:
        par = get_parallel()
        return int(par.attn_tp_rank), int(par.attn_tp_size)
    except AssertionError:  # no process group: a single process (tests build runners by hand)
        return int(getattr(model_runner, "tp_rank", 0)), int(getattr(model_runner, "tp_size", 1))


class RaBitQAttnBackend(AttentionBackend):
    def __init__(self, model_runner, config: RaBitQConfig, dense_backend: AttentionBackend):
        super().__init__()
        tp_rank, tp_size = _tp_rank_and_size(model_runner)
        check_runner(model_runner, tp_size)
        self.dense = dense_backend
        # the dense backend decodes the dense layers (torch_native cannot run in CUDA graphs: ours do)
        self.dense_decode = not isinstance(dense_backend, TorchNativeAttnBackend)
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_pool = model_runner.token_to_kv_pool
        cfg = model_runner.model_config
        self.num_kv_heads = cfg.get_num_kv_heads(tp_size)
        self.num_q_heads = cfg.get_num_attention_heads(tp_size)
        self.head_dim = cfg.head_dim
        num_layers = cfg.num_hidden_layers
        num_slots = self.kv_pool.size + self.kv_pool.page_size
        max_bs = self.req_to_token.shape[0]
        self.pool = CodePool(config, num_slots, max_bs, num_layers, self.num_kv_heads, self.head_dim,
                             self.device, kv_head_offset=tp_rank * self.num_kv_heads)
        config = self.config = self.pool.config  # flags not given, set for this model's head dim
        self.ws = DecodeWorkspace(max_bs, self.num_q_heads, self.num_kv_heads, self.head_dim, cfg.context_len, self.device,
                                  max_tokens=WORKSPACE_TOKENS_PER_SLOT * num_slots)
        self.planner = DecodePlanner(self.pool, self.ws, max_bs, self.device)
        sparse_keys = [self.kv_pool.get_key_buffer(lid) for lid in self.pool.sparse_layers]
        self._key_ptrs = key_pointers(sparse_keys) if sparse_keys else None
        metrics = bool(getattr(model_runner.server_args, "enable_metrics", False))
        self.stats = RaBitQStats(self.device, metrics)
        self.request_budgets = RequestBudgets(max_bs, self.device, metrics)
        self.last_sparse_layer = self.pool.sparse_layers[-1] if self.pool.sparse_layers else -1
        self._extend_slots = None
        self.calibration = None if self.pool.calibrated else CenterCalibration(self.pool, config.calibrate_tokens)
        self._dense_step = False  # this decode batch attends densely (set per batch, or per captured variant)
        self.min_batch_context = self._min_batch_context()
        self._dense_captured = set()  # batch sizes whose CUDA-graph state the dense backend has made
        self._compile_eager_kernels()
        if self.switches:
            logger.info("rabitq: decode batches under %d context tokens attend densely", self.min_batch_context)
        logger.info(
            "rabitq: %s; %d of %d layers sparse; code pool %.1f MiB for %d slots (%d B/token); decode workspace "
            "%.1f MiB; dense prefill: %s",
            config, len(self.pool.sparse_layers), num_layers, self.pool.nbytes() / 2**20, num_slots,
            self.pool.nbytes() // max(num_slots, 1), self.ws.nbytes() / 2**20, type(dense_backend).__name__,
        )

    def _compile_eager_kernels(self) -> None:
        """Compile now the kernels that run outside CUDA graphs while serving: the encode kernel (a
        list of -1 encodes nothing) and the plan kernel's serving variant (an empty batch). Else the
        first requests wait for the compiles, and the encode timer, whose device events bracket the
        launch, counts one as encode time."""
        self.planner.compile(self.req_to_token)
        if not self.pool.sparse_layers:
            return
        lid = self.pool.sparse_layers[0]
        codes, factor, rot = self.pool.buffers(lid)
        nothing = torch.full((1,), -1, dtype=torch.int64, device=self.device)
        encode_slots(self.kv_pool.get_key_buffer(lid), nothing, rot, self.pool.center[lid], codes, factor)
        self._encode_all_layers(nothing)

    def _encode_all_layers(self, slots: torch.Tensor) -> None:
        """Encode the keys at ``slots`` (-1 skipped) for every sparse layer, in one launch: run once the
        last sparse layer of a forward has written its keys."""
        encode_slots_all_layers(self._key_ptrs, self.kv_pool.get_key_buffer(self.last_sparse_layer), slots,
                                self.pool.stacked_rot, self.pool.sparse_center, self.pool.stacked_codes,
                                self.pool.stacked_factor)

    # ---- dense or sparse decode ---------------------------------------------------------------
    def _min_batch_context(self) -> int:
        """Decode batches below this total context attend densely: the flag's value, else (with a dense
        decode kernel to switch to) ``AUTO_DENSE_KV_BYTES`` of K/V; 0 where no layer would select."""
        if not self.pool.sparse_layers or self._attends_densely(self.last_sparse_layer):
            return 0
        if self.config.min_batch_context is None and not self.dense_decode:
            return 0
        kv_itemsize = self.kv_pool.get_key_buffer(self.pool.sparse_layers[0]).element_size()
        return self.config.batch_context_threshold(self.num_kv_heads, self.head_dim, kv_itemsize)

    @property
    def switches(self) -> bool:
        """Whether decode batches can take either path (two CUDA-graph variants per batch size)."""
        return self.min_batch_context > 0

    def dense_step(self, forward_batch) -> bool:
        """Whether this decode batch attends densely: its total context is below ``min_batch_context``
        (host-side lengths: no sync)."""
        if not self.switches:
            return False
        total = forward_batch.seq_lens_sum
        if total is None and forward_batch.seq_lens_cpu is not None:
            total = int(forward_batch.seq_lens_cpu.sum())
        # no host-side lengths (an idle batch of data-parallel attention): the dense backend's path
        return total is None or total < self.min_batch_context

    @contextlib.contextmanager
    def capturing(self, dense: bool):
        """The decode path a CUDA graph records while this is entered (``patches/cuda_graph.py``)."""
        self._dense_step = dense
        try:
            yield
        finally:
            self._dense_step = False

    # ---- metadata -------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self._dense_step = self.dense_step(forward_batch)
            if self.dense_decode:
                self.dense.init_forward_metadata(forward_batch)
            self._plan_decode(forward_batch, mutate=True)
            return
        self.dense.init_forward_metadata(forward_batch)
        rids = getattr(forward_batch, "rids", None)
        continuing = self.request_budgets.start(forward_batch.req_pool_indices, rids) if rids else None
        self._extend_slots, counts = plan_extend(
            self.pool, self.req_to_token, forward_batch.req_pool_indices, forward_batch.extend_prefix_lens,
            sum(forward_batch.extend_prefix_lens_cpu), forward_batch.seq_lens, forward_batch.out_cache_loc,
            continuing,
        )
        self.stats.add_many(("codes_reused", "codes_encoded"), counts)
        self._maybe_log()

    def _maybe_log(self) -> None:
        if self.stats.maybe_log():  # the same cadence (and host sync) reports the requests that ended
            self.request_budgets.collect()

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        # CUDA graphs cover decode only; this runs eagerly before capture and before each replay.
        # Both variants of a batch size (dense, sparse steps) share the dense backend's graph state:
        # it is made once, and the second capture plans it as a replay would
        if self.dense_decode:
            bs = forward_batch.batch_size
            first = in_capture and bs not in self._dense_captured
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture=first)
            if first:
                self._dense_captured.add(bs)
        self._plan_decode(forward_batch, mutate=not in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        if self.dense_decode:
            self.dense.init_forward_metadata_in_graph(forward_batch)

    def _plan_decode(self, forward_batch, mutate: bool):
        bsz = forward_batch.batch_size
        if bsz == 0:  # an idle batch (data-parallel attention): nothing to plan
            return
        self.planner.plan(self.req_to_token, forward_batch.req_pool_indices[:bsz], forward_batch.seq_lens[:bsz],
                          mutate=mutate)
        if mutate:
            self.stats.add_many(("dense_fallback_requests", "codes_encoded"), self.ws.plan.totals)
            self._maybe_log()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if max_bs > self.ws.plan.rows.shape[0]:
            raise ValueError(f"CUDA-graph batch {max_bs} exceeds the request pool ({self.ws.plan.rows.shape[0]})")
        if self.dense_decode:
            self.dense.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    # ---- forward --------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        lid = layer.layer_id
        if self.pool.is_sparse(lid):
            if self.calibration is not None and not self.calibration.done:
                self.calibration.observe(lid, k.view(-1, self.num_kv_heads, self.head_dim), self.kv_pool.get_key_buffer(lid))
            if lid == self.last_sparse_layer:  # every sparse layer's new keys are in the pool now
                self.stats.time_encode(lambda: self._encode_all_layers(self._extend_slots))
        return out

    def _attends_densely(self, layer_id: int) -> bool:
        return (not self.pool.is_sparse(layer_id) or (self.config.top_p >= 1.0 and self.config.max_budget >= 1.0)
                or self._dense_step)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        lid = layer.layer_id
        bsz = forward_batch.batch_size
        k_buf, v_buf = self.kv_pool.get_key_buffer(lid), self.kv_pool.get_value_buffer(lid)
        codes, factor, rot = self.pool.buffers(lid)
        # lazy refresh: the chunk of window tokens the planner picked (if any); a sparse step encodes it
        # inside every sparse layer's query launch, a dense one in one launch after the last layer
        pending = self.planner.encode_slots[: bsz * self.config.encode_chunk]
        dense = self._attends_densely(lid)
        if dense and self.dense_decode:
            out = self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        else:
            if save_kv_cache:
                self.kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
            q = q.reshape(bsz, self.num_q_heads, self.head_dim)
            out = torch.empty_like(q)
            rabitq_decode_layer(q, k_buf, v_buf, codes, factor, rot, self.req_to_token, self.ws, out,
                                sm_scale=layer.scaling, top_p=self.config.top_p, dense=dense,
                                rounding=self.config.rounding, score_temperature=self.config.score_temperature,
                                top_p_scope=self.config.top_p_scope, center=self.pool.center[lid],
                                pending=None if dense else pending, max_budget=self.config.max_budget)
            out = out.view(bsz, self.num_q_heads * self.head_dim)
        if dense and lid == self.last_sparse_layer:  # (every sparse layer attended densely)
            self._encode_all_layers(pending)
        if lid == self.last_sparse_layer:
            # budget of this layer as the step's sample (device-side, graph-safe)
            seq_lens = forward_batch.seq_lens[:bsz]
            attended = seq_lens * self.num_kv_heads if dense else self.ws.kept_tokens(bsz).sum(-1)
            # rows of seq_len 1 are CUDA-graph padding, and the whole batch in the capture's warm-up runs
            real = (seq_lens > 1).to(torch.int64)
            step = real.amax()
            self.stats.add_many(STEP_FIELDS, torch.stack([
                (attended * real).sum(), (seq_lens * real).sum() * self.num_kv_heads, step, step * int(self._dense_step)]))
            self.request_budgets.add_step(forward_batch.req_pool_indices[:bsz], seq_lens, attended, self.num_kv_heads)
        return out
