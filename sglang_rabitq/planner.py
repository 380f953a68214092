"""Planning, once per forward batch: which slots to encode, the decode regions, and the validity
bookkeeping of the code pool. Decode batches plan in one device launch (it runs before every
CUDA-graph replay), extend batches in a few torch ops whose sizes the host knows; neither syncs.
"""

from __future__ import annotations

import torch

from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.kernels.decode import CHUNK_ALIGN, DecodeWorkspace
from sglang_rabitq.kernels.plan import plan_decode


def plan_extend(pool: CodePool, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                total_prefix: int, seq_lens: torch.Tensor, out_cache_loc: torch.Tensor,
                continuing: torch.Tensor | None = None):
    """Slots an extend batch must encode: its new tokens plus any prefix slot without a valid code
    (e.g. the lazily-encoded tail of an earlier turn that the radix cache now shares).

    ``prefix_lens`` is the device tensor of the batch's prefix lengths and ``total_prefix`` their sum
    (known on the host). ``continuing`` (device bool per request, if known) marks later chunks of a
    chunked prefill: the codes a request encoded in its own earlier chunks are not counted as reused.
    Returns ``(slots, counts)``: every prefix slot and new slot in order, int64, with -1 for a prefix
    slot whose code is valid (the encode kernel skips it), and ``counts [2]`` on the device = (codes
    reused, codes to encode). Marks all of them valid and records that each request's codes reach its
    full length. Device ops of host-known sizes only: no host sync, so the scheduler can prepare the
    next batch while the GPU runs this one.
    """
    device = req_to_token.device
    new = out_cache_loc.to(torch.int64)
    rows_of_batch = req_pool_indices.to(torch.int64)
    if total_prefix:
        lens = prefix_lens.to(device=device, dtype=torch.int64)
        rows = torch.repeat_interleave(rows_of_batch, lens, output_size=total_prefix)
        starts = torch.cumsum(lens, 0) - lens
        cols = torch.arange(total_prefix, device=device) - torch.repeat_interleave(starts, lens, output_size=total_prefix)
        prefix = req_to_token[rows, cols].to(torch.int64)
        valid = pool.valid[prefix]
        slots = torch.cat([torch.where(valid, -1, prefix), new])
        encoded = slots.numel() - valid.sum()
        if continuing is not None:  # a request's own earlier chunks: encoded (and counted) then
            own = torch.repeat_interleave(continuing, lens, output_size=total_prefix) & (cols < pool.encoded_len[rows])
            valid = valid & ~own
        reused = valid.sum()
        pool.valid.index_fill_(0, prefix, True)  # a scalar fill: no copy from host memory
    else:
        slots = new
        reused = torch.zeros((), dtype=torch.int64, device=device)
        encoded = reused + slots.numel()
    pool.valid.index_fill_(0, new, True)
    pool.encoded_len[rows_of_batch] = seq_lens.to(torch.int32)
    return slots, torch.stack([reused, encoded])


class DecodePlanner:
    """Fills the decode workspace's plan and the lazy-encode slot list for one decode batch."""

    def __init__(self, pool: CodePool, ws: DecodeWorkspace, max_bs: int, device):
        self.pool, self.ws = pool, ws
        cfg = pool.config
        self.sink, self.window, self.chunk = cfg.sink, cfg.window, cfg.encode_chunk
        self.encode_slots = torch.full((max_bs * self.chunk,), -1, dtype=torch.int64, device=device)

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
             mutate: bool = True) -> None:
        """One launch (``kernels.plan``); ``ws.plan.totals`` then holds the requests planned dense and
        the slots this step encodes.

        Decoded tokens stay in the dense window until ``encode_chunk`` of them are older than the
        window; then they are encoded together, by every sparse layer during this forward.
        ``mutate=False`` (CUDA-graph capture, dummy batch) leaves the pool's state untouched.
        """
        bsz = req_pool_indices.shape[0]
        self._launch(req_to_token, req_pool_indices, seq_lens, self.ws.num_chunks(bsz), mutate)

    def compile(self, req_to_token: torch.Tensor) -> None:
        """Compile the plan kernel's serving variant on an empty batch (int64 indices and lengths, as
        SGLang passes them): it changes nothing but the rounding seed."""
        none = torch.zeros(0, dtype=torch.int64, device=req_to_token.device)
        self._launch(req_to_token, none, none, num_chunks=1, mutate=True)

    def _launch(self, req_to_token, req_pool_indices, seq_lens, num_chunks: int, mutate: bool) -> None:
        bsz = req_pool_indices.shape[0]
        plan_decode(req_pool_indices, seq_lens, req_to_token, self.pool.encoded_len, self.pool.valid,
                    self.ws.plan.rows, self.encode_slots[: bsz * self.chunk], self.ws.plan.totals, self.ws.seed,
                    capacity=self.ws.plan.capacity, num_chunks=num_chunks, sink=self.sink,
                    window=self.window, chunk=self.chunk, align=CHUNK_ALIGN, mutate=mutate)
