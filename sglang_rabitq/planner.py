"""Planning, once per forward batch: which slots to encode, the decode regions, and the validity
bookkeeping of the code pool. Decode batches plan in one device launch without a host sync (it
runs before every CUDA-graph replay); extend batches plan with torch ops on the host.
"""

from __future__ import annotations

import torch

from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.kernels.decode import CHUNK_ALIGN, DecodeWorkspace
from sglang_rabitq.kernels.plan import plan_decode


def plan_extend(pool: CodePool, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                prefix_lens: list[int], seq_lens: torch.Tensor, out_cache_loc: torch.Tensor):
    """Slots an extend batch must encode: its new tokens plus any prefix slot without a valid code
    (e.g. the lazily-encoded tail of an earlier turn that the radix cache now shares).

    Marks them valid and records that each request's codes reach its full length. Returns
    ``(slots, reused, encoded)``.
    """
    device = req_to_token.device
    total_prefix = int(sum(prefix_lens))
    if total_prefix:
        lens = torch.tensor(prefix_lens, device=device)
        rows = torch.repeat_interleave(req_pool_indices.to(device), lens)
        starts = torch.cumsum(lens, 0) - lens
        cols = torch.arange(total_prefix, device=device) - torch.repeat_interleave(starts, lens)
        prefix_slots = req_to_token[rows, cols].to(torch.int64)
        stale = prefix_slots[~pool.valid[prefix_slots]]
    else:
        stale = out_cache_loc.new_empty(0, dtype=torch.int64)
    slots = torch.cat([stale, out_cache_loc.to(torch.int64)])
    pool.valid.index_fill_(0, slots, True)  # a scalar fill: no copy from host memory
    pool.encoded_len[req_pool_indices.to(torch.int64)] = seq_lens.to(torch.int32)
    return slots, total_prefix - stale.numel(), slots.numel()


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
        plan_decode(req_pool_indices, seq_lens, req_to_token, self.pool.encoded_len, self.pool.valid,
                    self.ws.plan.rows, self.encode_slots[: bsz * self.chunk], self.ws.plan.totals, self.ws.seed,
                    capacity=self.ws.plan.capacity, num_chunks=self.ws.num_chunks(bsz), sink=self.sink,
                    window=self.window, chunk=self.chunk, align=CHUNK_ALIGN, mutate=mutate)
