"""The score pass's warp-ballot histogram (``kernels.histogram``) against counts in torch, on a GPU
(the interpreter runs no PTX; there the score pass takes ``tl.histogram``, tested with it). The score
kernel's own counts are compared with the reference's by the score tests, on the GPU with ballots."""

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from sglang_rabitq.kernels.histogram import ballot_counts, counts_by_key, key_masks
from sglang_rabitq.kernels.score import HIST_BLOCK_N
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS

pytestmark = pytest.mark.gpu


@triton.jit
def _ballot_histogram_kernel(logit_ptr, count_ptr, ok_ptr, top, start, end,
                             HBLOCK: tl.constexpr, BIN_W: tl.constexpr, VEC: tl.constexpr):
    # the score kernel's walk: VEC consecutive logits a thread, loaded all or none
    offs = tl.arange(0, HBLOCK)
    lead = offs // VEC * VEC
    key_bits = key_masks(offs // VEC)
    by_key = tl.zeros((HBLOCK,), tl.int32)
    keys_ok = tl.full((HBLOCK,), -1, tl.int32)
    for n0 in range(start, end, HBLOCK):
        lg = tl.load(logit_ptr + tl.multiple_of(n0, VEC) + offs, mask=lead < end - n0, other=0.0)
        k = top - tl.floor(lg.to(tl.float32) / BIN_W).to(tl.int32)
        part, seen = ballot_counts(tl.where(n0 + offs < end, k, -1), *key_bits)
        by_key += part
        keys_ok &= seen
    tl.store(count_ptr + tl.arange(0, 64), counts_by_key(by_key, HBLOCK, VEC))
    tl.store(ok_ptr, tl.min((keys_ok == -1).to(tl.int32), axis=0))


def _ballot_histogram(logits, top, start, end, vec, num_warps):
    count = torch.full((HIST_BINS,), -1, dtype=torch.int32, device=DEVICE)
    ok = torch.full((1,), -1, dtype=torch.int32, device=DEVICE)
    _ballot_histogram_kernel[(1,)](logits, count, ok, top, start, end, HBLOCK=HIST_BLOCK_N, BIN_W=BIN_WIDTH, VEC=vec,
                                   num_warps=num_warps)
    return count.cpu(), int(ok)


def _expected(logits, top, start, end):
    k = top - torch.floor(logits[start:end].float().cpu() / BIN_WIDTH).long()
    return torch.bincount(k[(k >= 0) & (k < HIST_BINS)], minlength=HIST_BINS).int()


@pytest.mark.parametrize("num_warps", [2, 4])
@pytest.mark.parametrize("start,end", [(0, 3000), (128, 700), (256, 300), (0, 512)])
def test_ballot_histogram_counts_every_bin(num_warps, start, end, fresh_seed):
    logits = (torch.randn(4096) * 4).half().to(DEVICE)  # bins below 0 and past 63 too
    top = int(torch.floor(logits[start:end].float().max() / BIN_WIDTH)) - 3  # a few logits above the top bin
    vec = min(8, HIST_BLOCK_N // (32 * num_warps))  # as the score kernel's
    count, ok = _ballot_histogram(logits, top, start, end, vec, num_warps)
    assert ok == 1  # the layout the score kernel assumes is the one Triton gives
    assert torch.equal(count, _expected(logits, top, start, end))


@pytest.mark.parametrize("num_warps", [2, 4])
def test_ballot_histogram_detects_a_layout_other_than_assumed(num_warps, fresh_seed):
    logits = (torch.randn(2048) * 2).half().to(DEVICE)
    top = int(torch.floor(logits.float().max() / BIN_WIDTH))
    # keys for 16 logits per thread, where a 16-byte load gives each thread at most 8: lanes collide
    _, ok = _ballot_histogram(logits, top, 0, 2000, 16, num_warps)
    assert ok == 0
