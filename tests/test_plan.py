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
