"""A small serving loop over SGLang's real CPU-capable pieces: ReqToTokenPool, MHATokenToKVPool,
TokenToKVPoolAllocator, RadixCache, ForwardBatch and RadixAttention layers. Only the model runner
is a namespace (the real one needs a model and a GPU); it exposes what attention backends read."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode


class ModelShape(SimpleNamespace):
    def get_num_kv_heads(self, tp):
        return self.kv_heads // tp

    def get_num_attention_heads(self, tp):
        return self.q_heads // tp


class Harness:
    def __init__(self, layers=3, q_heads=4, kv_heads=2, head_dim=64, slots=4096, reqs=8, context=2048,
                 dtype=torch.bfloat16, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.req_pool = ReqToTokenPool(size=reqs, max_context_len=context, device="cpu", enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=slots, page_size=1, dtype=dtype, head_num=kv_heads, head_dim=head_dim,
                                        layer_num=layers, device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(slots, dtype, "cpu", self.kv_pool, need_sort=False)
        self.radix = RadixCache(CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                                token_to_kv_pool_allocator=self.allocator, page_size=1))
        self.shape = ModelShape(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
                                num_hidden_layers=layers, context_len=context, attention_arch="MHA")
        self.runner = SimpleNamespace(
            device="cpu", model_config=self.shape, req_to_token_pool=self.req_pool, token_to_kv_pool=self.kv_pool,
            token_to_kv_pool_allocator=self.allocator, server_args=SimpleNamespace(speculative_algorithm=None),
            page_size=1, sliding_window_size=None, tp_rank=0, tp_size=1, use_mla_backend=False,
        )
        self.layers = [RadixAttention(q_heads, head_dim, head_dim**-0.5, kv_heads, layer_id=i) for i in range(layers)]
        self.free_rows = list(range(reqs))

    # ---- request bookkeeping ----
    def new_request(self, tokens: list[int]):
        """Match the radix cache, allocate the rest; returns (row, prefix_len)."""
        row = self.free_rows.pop(0)
        match = self.radix.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        prefix = match.device_indices
        n_pre = len(prefix)
        new = self.allocator.alloc(len(tokens) - n_pre)
        self.req_pool.req_to_token[row, :n_pre] = prefix.to(torch.int32)
        self.req_pool.req_to_token[row, n_pre : len(tokens)] = new.to(torch.int32)
        return row, n_pre, new

    def append_token(self, row: int, length: int):
        slot = self.allocator.alloc(1)
        self.req_pool.req_to_token[row, length] = slot.to(torch.int32)
        return slot

    def finish(self, row: int, tokens: list[int]):
        """Cache the request's tokens in the radix tree and release its row."""
        slots = self.req_pool.req_to_token[row, : len(tokens)].to(torch.int64)
        res = self.radix.insert(InsertParams(key=RadixKey(tokens), value=slots.clone()))
        # slots of a prefix the tree already held are duplicates: free them, as SGLang does
        if res.prefix_len:
            self.allocator.free(slots[: res.prefix_len][slots[: res.prefix_len] != self.radix.match_prefix(
                MatchPrefixParams(key=RadixKey(tokens))).device_indices[: res.prefix_len]])
        self.free_rows.append(row)

    # ---- forward batches ----
    def rand_qkv(self, n):
        s = self.shape
        q = torch.randn(n, s.q_heads * s.head_dim, generator=self.gen).to(self.dtype)
        k = torch.randn(n, s.kv_heads, s.head_dim, generator=self.gen).to(self.dtype)
        v = torch.randn(n, s.kv_heads, s.head_dim, generator=self.gen).to(self.dtype)
        return q, k, v

    def extend_batch(self, rows, prefix_lens, seq_lens, out_cache_loc, rids=None, mode=ForwardMode.EXTEND):
        """``mode=ForwardMode.MIXED``: some rows are running requests' decode tokens (one new token on a
        prefix of all the earlier ones), as --enable-mixed-chunk batches them with a prefill chunk."""
        ext = [s - p for s, p in zip(seq_lens, prefix_lens)]
        fb = ForwardBatch(
            forward_mode=mode, batch_size=len(rows), input_ids=torch.zeros(sum(ext), dtype=torch.int64),
            req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens), out_cache_loc=out_cache_loc.to(torch.int64),
            seq_lens_sum=sum(seq_lens),
        )
        fb.seq_lens_cpu = torch.tensor(seq_lens)
        fb.extend_prefix_lens = torch.tensor(prefix_lens)
        fb.extend_seq_lens = torch.tensor(ext)
        fb.extend_prefix_lens_cpu = list(prefix_lens)
        fb.extend_seq_lens_cpu = list(ext)
        fb.extend_start_loc = torch.cumsum(torch.tensor([0] + ext[:-1]), 0)
        fb.positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
        fb.req_to_token_pool = self.req_pool
        fb.token_to_kv_pool = self.kv_pool
        fb.rids = rids  # as the scheduler names them (None: unnamed)
        return fb

    def decode_batch(self, rows, seq_lens, out_cache_loc):
        fb = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=len(rows), input_ids=torch.zeros(len(rows), dtype=torch.int64),
            req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens), out_cache_loc=out_cache_loc.to(torch.int64),
            seq_lens_sum=sum(seq_lens),
        )
        fb.seq_lens_cpu = torch.tensor(seq_lens)
        fb.positions = torch.tensor(seq_lens) - 1
        fb.req_to_token_pool = self.req_pool
        fb.token_to_kv_pool = self.kv_pool
        return fb

    def run(self, backend, fb, n_tokens, qkv=None):
        """One forward of every layer; returns the outputs per layer. ``qkv(layer_id)`` gives the
        layer's (q, k, v); by default they are fresh random tensors."""
        backend.init_forward_metadata(fb)
        outs = []
        for layer in self.layers:
            q, k, v = self.rand_qkv(n_tokens) if qkv is None else qkv(layer.layer_id)
            outs.append((q, backend.forward(q, k, v, layer, fb)))
        return outs
