"""Host-side planning, once per forward batch: which slots to encode, the decode regions, and the
validity bookkeeping of the code pool (torch ops only on the decode path: no host sync, so it
runs before a CUDA-graph replay).
"""

from __future__ import annotations

import torch

from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.kernels.decode import DecodeWorkspace


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
    pool.valid[slots] = True
    pool.encoded_len[req_pool_indices.to(torch.int64)] = seq_lens.to(torch.int32)
    return slots, total_prefix - stale.numel(), slots.numel()


class DecodePlanner:
    """Fills the decode workspace's plan and the lazy-encode slot list for one decode batch."""

    def __init__(self, pool: CodePool, ws: DecodeWorkspace, max_bs: int, device):
        self.pool, self.ws = pool, ws
        cfg = pool.config
        self.sink, self.window, self.chunk = cfg.sink, cfg.window, cfg.encode_chunk
        self.encode_slots = torch.full((max_bs * self.chunk,), -1, dtype=torch.int64, device=device)
        self.offsets = torch.arange(self.chunk, device=device, dtype=torch.int32)

    def plan(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
             mutate: bool = True) -> torch.Tensor:
        """Returns the number of slots encoded this step (device scalar).

        Decoded tokens stay in the dense window until ``encode_chunk`` of them are older than the
        window; then they are encoded together, by every sparse layer during this forward.
        ``mutate=False`` (CUDA-graph capture, dummy batch) leaves the pool's state untouched.
        """
        pool = self.pool
        bsz = req_pool_indices.shape[0]
        rpi = req_pool_indices.to(torch.int64)
        length = seq_lens.to(torch.int32)
        encoded = pool.encoded_len[rpi]
        self.ws.plan.fill(rpi, length, encoded, self.sink, self.window, self.ws.num_chunks(bsz))
        slots_out = self.encode_slots[: bsz * self.chunk].view(bsz, self.chunk)
        if not mutate:
            slots_out.fill_(-1)
            return torch.zeros((), dtype=torch.int64, device=rpi.device)
        self.ws.seed += 1  # fresh noise for randomized query rounding
        real = length > 1  # CUDA-graph padding rows carry seq_len 1; a real decode row has >= 2
        cols = req_to_token.shape[1]
        # the token written this step takes a slot whose old code (if any) is stale
        new_slot = req_to_token[rpi, (length - 1).clamp(0, cols - 1).long()].long()
        pool.valid[torch.where(real, new_slot, pool.dump_slot)] = False
        count = torch.where(real & (length - encoded >= self.window + self.chunk), self.chunk, 0)
        pos = (encoded[:, None] + self.offsets[None, :]).clamp(max=cols - 1).long()
        take = self.offsets[None, :] < count[:, None]
        slots = req_to_token[rpi[:, None], pos].long()
        slots_out.copy_(torch.where(take, slots, -1))
        pool.valid[torch.where(take, slots, pool.dump_slot)] = True
        pool.encoded_len[torch.where(real, rpi, pool.dump_req)] = encoded + count.to(torch.int32)
        return count.sum()
