"""One layer's decode step on synthetic inputs, and its timing: what ``bench_kernels.py`` and
``ab_step.py`` measure. Only the package's public kernel API is used (``DecodeWorkspace``,
``encode_slots``, ``rabitq_decode_layer``), so the same inputs can drive two versions of it.

The budget is set by planting "hot" keys aligned with their queries' group (a fraction of every
request's tokens): top-p then keeps about that fraction.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton

import sglang_rabitq.kernels as rabitq_kernels
from sglang_rabitq.kernels import DecodeWorkspace, encode_slots, rabitq_decode_layer
from sglang_rabitq.reference import random_rotation

# (query heads, kv-heads, head_dim)
SHAPES = {"llama3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64), "qwen2.5-1.5b": (12, 2, 128)}


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median") * 1000.0  # us


def capture(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_time(fn):
    """Median time (us) of ``fn`` captured in a CUDA graph and replayed."""
    return bench(capture(fn).replay)


def kernel_times(fn, reps: int = 20) -> dict:
    """Per kernel of ``fn``'s graph replay: mean device time (us) per replay, from the profiler's
    kernel records; ``"gaps"``: the rest of a replay's span (first kernel start to last kernel end),
    i.e. the time the chain of launches leaves the GPU between kernels."""
    from torch.profiler import ProfilerActivity, profile

    g = capture(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
            torch.cuda.synchronize()  # one replay per span: the spans do not overlap
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.name != "Memset (Device)"),
                     key=lambda e: e.time_range.start)
    per_replay = len(kernels) // reps
    out: dict[str, float] = {}
    span = 0.0
    for r in range(reps):
        run = kernels[r * per_replay : (r + 1) * per_replay]
        span += run[-1].time_range.end - run[0].time_range.start
        for e in run:
            name = e.name.split("(")[0].split("<")[0].strip().removeprefix("_").removesuffix("_kernel")
            out[name] = out.get(name, 0.0) + e.time_range.elapsed_us()
    out = {k: v / reps for k, v in out.items()}
    out["gaps"] = span / reps - sum(out.values())
    return out


class Setup:
    """A batch of ``bs`` requests of ``ctx`` tokens each, K/V in a pool of page size 1 (seeded)."""

    def __init__(self, hq, hkv, d, ctx, bs, seed=0, device="cuda", key_bits=1):
        torch.manual_seed(seed)
        n = ctx * bs + 1
        self.hq, self.hkv, self.d, self.ctx, self.bs = hq, hkv, d, ctx, bs
        self.k = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16)
        self.v = torch.randn(n, hkv, d, device=device, dtype=torch.bfloat16)
        self.q = torch.randn(bs, hq, d, device=device, dtype=torch.bfloat16)
        self.r2t = (torch.arange(bs * ctx, device=device, dtype=torch.int32) + 1).view(bs, ctx)
        self.rot = random_rotation(d, seed=1, num_heads=hkv).to(device)
        self.center = torch.zeros(hkv, d, device=device)
        if key_bits != 1:  # (only then: a tree from before multi-bit codes takes no bits)
            self.codes, self.factor = rabitq_kernels.code_buffers(n, hkv, d, device, bits=key_bits)
        elif hasattr(rabitq_kernels, "code_buffers"):  # the layout the tree's code pool allocates
            self.codes, self.factor = rabitq_kernels.code_buffers(n, hkv, d, device)
        else:  # a tree from before the kv-head-major layout: its kernels read factors slot-major only
            self.codes = torch.zeros(n, hkv, d // 32, dtype=torch.int32, device=device)
            self.factor = torch.zeros(n, hkv, device=device)
        self.out = torch.empty_like(self.q)
        self.ws = DecodeWorkspace(bs, hq, hkv, d, ctx, device)
        self.seq = torch.full((bs,), ctx, device=device, dtype=torch.int32)
        self.rpi = torch.arange(bs, device=device)

    def plant(self, frac: float, sink=64, window=64):
        """Make ``frac`` of every request's tokens strongly aligned with its query group."""
        g = self.hq // self.hkv
        group_dir = self.q.float().view(self.bs, self.hkv, g, self.d).sum(2)
        group_dir = group_dir / group_dir.norm(dim=-1, keepdim=True)
        hot = torch.rand(self.bs, self.ctx, device=self.q.device) < frac
        slots = self.r2t[hot].long()
        req = torch.nonzero(hot)[:, 0]
        self.k[slots] = (group_dir[req] * 8 * math.sqrt(g)).to(self.k.dtype)
        all_slots = self.r2t.flatten().long()
        encode_slots(self.k, all_slots, self.rot, self.center, self.codes, self.factor)
        self.ws.plan.fill(self.rpi, self.seq, self.seq, sink, window, self.ws.num_chunks(self.bs))

    def ours(self, top_p, chunk: int = 64, max_budget: float = 1.0):
        """The step as serving runs it: with a lazy-encode list of ``chunk`` slots per request (all
        padding, as on most steps). A tree whose decode launch does not take it encodes it on its own.
        ``max_budget`` < 1: with the cap on each kv-head's union (``--rabitq-max-budget``)."""
        pending = torch.full((self.bs * chunk,), -1, dtype=torch.int64, device=self.q.device)
        fused = "pending" in inspect.signature(rabitq_decode_layer).parameters
        extra = dict(pending=pending) if fused else {}
        if max_budget < 1.0:  # (only then: a tree from before the cap has no such parameter)
            extra["max_budget"] = max_budget

        def step():
            if not fused:
                encode_slots(self.k, pending, self.rot, self.center, self.codes, self.factor)
            rabitq_decode_layer(self.q, self.k, self.v, self.codes, self.factor, self.rot, self.r2t, self.ws, self.out,
                                sm_scale=self.d**-0.5, top_p=top_p, center=self.center, **extra)
        return step

    def budget(self) -> float:
        """Tokens the last step attended per kv-head, over the context."""
        return self.ws.kept_tokens(self.bs).sum().item() / (self.bs * self.hkv * self.ctx)
