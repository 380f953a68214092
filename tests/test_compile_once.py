"""A new batch size must not make a serving step wait for a Triton compile.

Triton compiles one variant of a kernel per specialization of its runtime arguments (an integer is
specialized as 1, a multiple of 16, or other; a pointer by its alignment), so an integer that follows
the batch would compile anew in the middle of serving. These tests record every launch of each kernel
(a pre-run hook: under the interpreter on CPU, for real on a GPU), bind its arguments the way
Triton's JIT does for an sm_90 target, and check that the runtime arguments give a single key across
batch sizes. Constexprs that follow the batch (the threshold kernel's power-of-two chunk count) change
only between the power-of-two buckets that CUDA graphs capture at startup; they are not part of the key.
"""

from contextlib import contextmanager

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from conftest import DEVICE
from kernel_cases import make_batch
from sglang_rabitq.code_pool import CodePool
from sglang_rabitq.config import RaBitQConfig
from sglang_rabitq.kernels import (
    DecodeWorkspace,
    encode_slots,
    encode_slots_all_layers,
    key_pointers,
    rabitq_decode_layer,
)
from sglang_rabitq.kernels.encode import _encode_kernel, _encode_layers_kernel
from sglang_rabitq.kernels.plan import _plan_kernel
from sglang_rabitq.kernels.query import _prepare_query_kernel
from sglang_rabitq.kernels.score import _score_kernel
from sglang_rabitq.kernels.select import _threshold_kernel
from sglang_rabitq.kernels.sparse_attention import _merge_kernel, _sparse_attention_kernel
from sglang_rabitq.planner import DecodePlanner

SM90 = make_backend(GPUTarget("cuda", 90, 32))


@contextmanager
def recorded(*kernels):
    """Yields {kernel: [runtime specialization key of each launch]} for the launches in the block."""
    keys = {k: [] for k in kernels}
    hooks = []
    for kernel in kernels:
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        binder = create_function_from_signature(jit.signature, jit.params, SM90)
        runtime = [not p.is_constexpr for p in jit.params]

        def hook(*args, _binder=binder, _runtime=runtime, _out=keys[kernel], **kwargs):
            _, spec, _ = _binder(*args, **kwargs)
            _out.append(tuple(s for s, r in zip(spec, _runtime) if r))

        kernel.add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    try:
        yield keys
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)


def test_the_decode_planner_compiles_once_for_every_batch_size():
    """It runs outside the CUDA graphs before every decode step: its startup compile must serve
    batches of 1, 3, 16 and 17 requests (chunk counts 1 to 8) alike."""
    max_bs, context = 20, 4096
    pool = CodePool(RaBitQConfig(dense_layers=1), 5000, max_bs, 3, 2, 64, DEVICE)
    ws = DecodeWorkspace(max_bs, 4, 2, 64, context, DEVICE, num_sms=1)
    planner = DecodePlanner(pool, ws, max_bs, DEVICE)
    req_to_token = torch.arange(max_bs * context, dtype=torch.int32, device=DEVICE).view(max_bs, context) % 4999 + 1
    with recorded(_plan_kernel) as keys:
        planner.compile(req_to_token)
        chunk_counts = set()
        for bsz in (1, 3, 16, 17):
            rows = torch.arange(bsz, dtype=torch.int64, device=DEVICE)
            seq_lens = torch.full((bsz,), 1000, dtype=torch.int64, device=DEVICE)
            planner.plan(req_to_token, rows, seq_lens)
            chunk_counts.add(ws.num_chunks(bsz))
    assert len(keys[_plan_kernel]) == 5
    assert len(chunk_counts) >= 3 and 1 in chunk_counts  # the sizes do vary, through the value 1
    assert len(set(keys[_plan_kernel])) == 1


def test_the_encode_kernels_compile_once_for_every_slot_count():
    """One layer's (calibration) and every sparse layer's (each extend batch, each dense decode step)."""
    k_bufs = [torch.randn(300, 2, 64, device=DEVICE).to(torch.bfloat16) for _ in range(2)]
    pool = CodePool(RaBitQConfig(dense_layers=0), 300, 4, 2, 2, 64, DEVICE)
    codes, factor, rot = pool.buffers(0)
    key_table = key_pointers(k_bufs)
    with recorded(_encode_kernel, _encode_layers_kernel) as keys:
        for n in (1, 16, 17, 64, 100):
            slots = torch.randperm(299, device=DEVICE)[:n] + 1
            encode_slots(k_bufs[0], slots, rot, pool.center[0], codes, factor)
            encode_slots_all_layers(key_table, k_bufs[0], slots, pool.stacked_rot, pool.sparse_center,
                                    pool.stacked_codes, pool.stacked_factor)
    for kernel in (_encode_kernel, _encode_layers_kernel):
        assert len(keys[kernel]) == 5, kernel
        assert len(set(keys[kernel])) == 1, kernel


def test_the_decode_layer_kernels_compile_once_across_batch_sizes(fresh_seed):
    """Without CUDA graphs (--disable-cuda-graph, or a batch above the largest captured one) the
    whole layer runs eagerly: batches of 1, 3 and 16 requests give chunk counts 8, 2 and 1."""
    hq, hkv, d, max_context = 4, 2, 64, 4096
    kernels = (_prepare_query_kernel, _score_kernel, _threshold_kernel, _sparse_attention_kernel, _merge_kernel)
    ws = DecodeWorkspace(16, hq, hkv, d, max_context, DEVICE, num_sms=1)
    chunk_counts = []
    with recorded(*kernels) as keys:
        for bsz in (1, 3, 16):
            batch = make_batch([150 + 7 * i for i in range(bsz)], hq, hkv, d, DEVICE, seed=fresh_seed + bsz)
            nc = ws.num_chunks(bsz)
            chunk_counts.append(nc)
            ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 16, 16, nc)
            out = torch.empty(bsz, hq, d, device=DEVICE, dtype=torch.bfloat16)
            rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                                batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.9)
    assert chunk_counts == [8, 2, 1]
    for kernel in kernels:
        assert len(keys[kernel]) == 3, kernel
        assert len(set(keys[kernel])) == 1, kernel
