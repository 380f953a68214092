"""The one-launch decode planner against its torch reference, on random pool states."""

import pytest
import torch
from conftest import DEVICE

from sglang_rabitq.kernels.decode import CHUNK_ALIGN
from sglang_rabitq.kernels.plan import PLAN_BLOCK_B, plan_decode
from sglang_rabitq.reference.plan import plan_decode as plan_decode_ref

SINK, WINDOW = 16, 32


def random_state(bsz: int, chunk: int, gen: torch.Generator):
    """A decode batch over a pool: some requests with long unencoded tails, some CUDA-graph padding rows."""
    rows, cols = bsz + 5, 700
    slots = rows * cols + 1
    req_to_token = torch.randperm(slots - 1, generator=gen)[: rows * cols].view(rows, cols).to(torch.int32) + 1
    rpi = torch.randperm(rows, generator=gen)[:bsz]
    seq_lens = torch.randint(2, cols + 1, (bsz,), generator=gen)
    encoded_len = torch.zeros(rows + 1, dtype=torch.int32)
    tail = torch.randint(0, WINDOW + 2 * chunk, (bsz,), generator=gen)
    encoded_len[rpi] = torch.clamp(seq_lens - tail, min=0).to(torch.int32)
    pad = torch.rand(bsz, generator=gen) < 0.15
    seq_lens[pad] = 1  # padding rows: seq_len 1
    valid = torch.rand(slots + 1, generator=gen) < 0.5
    return req_to_token, rpi, seq_lens, encoded_len, valid


@pytest.mark.parametrize("bsz,chunk", [(1, 64), (7, 48), (PLAN_BLOCK_B + 45, 64)])
@pytest.mark.parametrize("mutate", [True, False])
def test_plan_kernel_matches_reference(bsz, chunk, mutate, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    req_to_token, rpi, seq_lens, encoded_len, valid = random_state(bsz, chunk, gen)
    num_chunks = int(torch.randint(1, 9, (1,), generator=gen))
    # room for about two thirds of the batch: the rest is planned dense
    capacity = int(seq_lens.sum()) * 2 // 3 + CHUNK_ALIGN
    kw = dict(capacity=capacity, num_chunks=num_chunks, sink=SINK, window=WINDOW, chunk=chunk, align=CHUNK_ALIGN,
              mutate=mutate)
    ref_valid, ref_encoded_len = valid.clone(), encoded_len.clone()
    ref = plan_decode_ref(rpi, seq_lens, req_to_token, ref_encoded_len, ref_valid, **kw)

    dev = dict(device=DEVICE)
    d_valid, d_encoded_len = valid.to(**dev), encoded_len.to(**dev)
    rows = torch.full((bsz, 6), -7, dtype=torch.int32, **dev)  # poisoned: every field must be written
    encode_slots = torch.full((bsz * chunk,), -7, dtype=torch.int64, **dev)
    totals = torch.full((2,), -7, dtype=torch.int64, **dev)
    seed = torch.tensor([5], dtype=torch.int64, **dev)
    plan_decode(rpi.to(**dev), seq_lens.to(**dev), req_to_token.to(**dev), d_encoded_len, d_valid, rows,
                encode_slots, totals, seed, **kw)

    assert torch.equal(rows.cpu(), ref["rows"])
    assert torch.equal(encode_slots.cpu(), ref["encode_slots"])
    assert totals.cpu().tolist() == [ref["overflow"], ref["encoded"]]
    assert torch.equal(d_valid.cpu(), ref_valid)
    assert torch.equal(d_encoded_len.cpu(), ref_encoded_len)
    assert int(seed) == (6 if mutate else 5)
    if mutate:  # the random state exercises each path
        assert ref["overflow"] > 0 and ref["encoded"] > 0 or bsz < 8
    else:
        assert torch.equal(valid, ref_valid) and torch.equal(encoded_len, ref_encoded_len)


def _extend_state(gen: torch.Generator):
    """A pool with random code validity and an extend batch of three requests: two with cached
    prefixes (one shared by both: the same slots appear twice), one without."""
    from sglang_rabitq.code_pool import CodePool
    from sglang_rabitq.config import RaBitQConfig

    slots, cols = 4000, 600
    pool = CodePool(RaBitQConfig(dense_layers=1), slots, 6, 2, 1, 64, DEVICE)
    pool.valid.copy_(torch.rand(pool.valid.numel(), generator=gen) < 0.6)
    req_to_token = torch.zeros(6, cols, dtype=torch.int32)
    perm = torch.randperm(slots - 1, generator=gen) + 1
    prefix_lens, new_lens, rpi = [300, 0, 120], [50, 80, 30], [4, 1, 2]
    shared = perm[:300]
    req_to_token[4, :300] = shared
    req_to_token[2, :120] = shared[:120]
    new = perm[300:300 + sum(new_lens)]
    off = 0
    for row, p, n in zip(rpi, prefix_lens, new_lens):
        req_to_token[row, p:p + n] = new[off:off + n]
        off += n
    return pool, req_to_token, prefix_lens, new_lens, rpi, new


def test_plan_extend_lists_every_slot_and_marks_valid_ones_skipped(fresh_seed):
    from sglang_rabitq.planner import plan_extend

    gen = torch.Generator().manual_seed(fresh_seed)
    pool, req_to_token, prefix_lens, new_lens, rpi, new = _extend_state(gen)
    valid_before = pool.valid.cpu().clone()
    dev = dict(device=DEVICE)
    seq = torch.tensor([p + n for p, n in zip(prefix_lens, new_lens)])
    slots, counts = plan_extend(pool, req_to_token.to(**dev), torch.tensor(rpi, **dev),
                                torch.tensor(prefix_lens, dtype=torch.int32, **dev), sum(prefix_lens), seq.to(**dev),
                                new.to(**dev))
    prefix = torch.cat([req_to_token[r, :p].long() for r, p in zip(rpi, prefix_lens)])
    expect = torch.cat([torch.where(valid_before[prefix], -1, prefix), new.long()])
    assert torch.equal(slots.cpu(), expect)
    reused = int(valid_before[prefix].sum())
    assert counts.cpu().tolist() == [reused, expect.numel() - reused]
    assert pool.valid.cpu()[torch.cat([prefix, new.long()])].all()
    untouched = torch.ones_like(valid_before)
    untouched[torch.cat([prefix, new.long()])] = False
    assert torch.equal(pool.valid.cpu()[untouched], valid_before[untouched])
    assert pool.encoded_len.cpu()[rpi].tolist() == seq.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs exist on a GPU only")
def test_planning_never_syncs_the_host(fresh_seed):
    """Extend and decode planning (and the request-budget bookkeeping) run once per batch on the
    scheduler's critical path: a sync there stalls the host until the GPU drains, and the overlap
    scheduler loses its overlap."""
    from sglang_rabitq.planner import plan_extend

    gen = torch.Generator().manual_seed(fresh_seed)
    pool, req_to_token, prefix_lens, new_lens, rpi, new = _extend_state(gen)
    args = [pool, req_to_token.cuda(), torch.tensor(rpi).cuda(), torch.tensor(prefix_lens, dtype=torch.int32).cuda(),
            sum(prefix_lens), torch.tensor([p + n for p, n in zip(prefix_lens, new_lens)]).cuda(), new.cuda()]
    d_rt, rpi_d, seq_d, enc_d, valid_d = (t.cuda() for t in random_state(7, 64, gen))
    rows = torch.zeros(7, 6, dtype=torch.int32, device="cuda")
    enc_slots = torch.zeros(7 * 64, dtype=torch.int64, device="cuda")
    totals, seed = torch.zeros(2, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    kw = dict(capacity=10**6, num_chunks=4, sink=SINK, window=WINDOW, chunk=64, align=CHUNK_ALIGN, mutate=True)
    plan_extend(*args)  # first calls compile and allocate outside the check
    plan_decode(rpi_d, seq_d, d_rt, enc_d, valid_d, rows, enc_slots, totals, seed, **kw)
    torch.cuda.synchronize()
    from sglang_rabitq.request_budget import RequestBudgets

    budgets = RequestBudgets(6, "cuda", export_metrics=False)
    budgets.start(args[2], ["warm-0", "warm-1", "warm-2"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        budgets.start(args[2], ["req-0", "req-1", "req-2"])
        plan_extend(*args)
        plan_decode(rpi_d, seq_d, d_rt, enc_d, valid_d, rows, enc_slots, totals, seed, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
