"""Kernels vs the plain-torch reference. On CPU they run under TRITON_INTERPRET=1 on small shapes;
the same checks run on large shapes on a GPU. Inputs are fresh random tensors every run."""

import math

import pytest
import torch
import triton
import triton.language as tl

from kernel_cases import make_batch
from conftest import DEVICE
from sglang_rabitq.kernels import (
    DecodeWorkspace,
    code_buffers,
    encode_slots,
    encode_slots_all_layers,
    key_pointers,
    prepare_query,
    rabitq_decode_layer,
)
from sglang_rabitq.kernels.estimate import offsets_fit_32, table_words
import sglang_rabitq.kernels.decode as decode
import sglang_rabitq.kernels.launch_chain as launch_chain
import sglang_rabitq.kernels.score as score_module
from sglang_rabitq.kernels.score import ChunkStats, mma_estimate, score_chunks
from sglang_rabitq.kernels.select import bins_between, cap_union, top_p_threshold
from sglang_rabitq.kernels.sparse_attention import merge_constexprs, merge_partials
from sglang_rabitq.kernels.decode import CHUNK_ALIGN, DecodePlan, chunks_for_batch
from sglang_rabitq.kernels.query import query_heads_per_program
from sglang_rabitq.reference.decode import dense_region_lse
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS
from sglang_rabitq.reference import (
    code_values,
    encode_keys,
    estimate_int,
    hist_threshold,
    quantize_query,
    union_cap_thresholds,
    query_nibble_table,
    rabitq_decode,
    random_rotation,
    rotate,
    unpack_bits,
)

GPU = pytest.mark.gpu
ON_GPU = DEVICE == "cuda"


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encode_bit_exact(d, dtype, fresh_seed):
    h, n = 2, (3000 if ON_GPU else 70)
    keys = torch.randn(n, h, d).to(dtype)
    rot = random_rotation(d, seed=fresh_seed, num_heads=h)
    center = torch.randn(h, d) * 0.1
    slots = torch.randperm(n)[: n - 5]
    slots = torch.cat([slots, torch.tensor([-1, -1])])  # padding entries are skipped
    codes = torch.full((n, h, d // 32), 0x5A5A5A5A, dtype=torch.int32)  # poison
    factor = torch.full((n, h), float("nan"))
    dev = dict(device=DEVICE)
    c_dev, f_dev = codes.to(**dev), factor.to(**dev)
    encode_slots(keys.to(**dev), slots.to(**dev), rot.to(**dev), center.to(**dev), c_dev, f_dev)
    ref_codes, ref_factor = encode_keys(keys.float(), rot, center)
    written = slots[slots >= 0]
    got_bits = unpack_bits(c_dev.cpu()[written])
    ref_bits = unpack_bits(ref_codes[written])
    # bits may differ only where a rotated component is within float rounding of zero
    o = rotate(keys.double()[written] - center.double(), rot.double())
    near_zero = o.abs() < 1e-5 * o.norm(dim=-1, keepdim=True)
    assert torch.equal(got_bits[~near_zero], ref_bits[~near_zero])
    assert torch.allclose(f_dev.cpu()[written], ref_factor[written], rtol=1e-5)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[written] = False
    assert (c_dev.cpu()[untouched] == 0x5A5A5A5A).all() and f_dev.cpu()[untouched].isnan().all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_encode_multi_bit_codes_match_reference(bits, d, fresh_seed):
    """Levels equal the reference's except where a key's grid scales are within float rounding of a
    tie (the kernel's choice then as close in angle to the key), factors those of the kernel's levels."""
    h, n = 2, (3000 if ON_GPU else 70)
    keys = torch.randn(n, h, d).to(torch.bfloat16)
    rot = random_rotation(d, seed=fresh_seed, num_heads=h)
    center = torch.randn(h, d) * 0.1
    slots = torch.cat([torch.randperm(n)[: n - 5], torch.tensor([-1, -1])])
    codes, factor = code_buffers(n, h, d, DEVICE, bits=bits)
    codes.fill_(0x5A5A5A5A)
    factor.fill_(float("nan"))
    encode_slots(keys.to(DEVICE), slots.to(DEVICE), rot.to(DEVICE), center.to(DEVICE), codes, factor)
    written = slots[slots >= 0]
    ref_codes, _ = encode_keys(keys.float()[written], rot, center, bits=bits)
    got_codes = codes.cpu()[written]
    same = (got_codes == ref_codes).all(-1)
    assert same.float().mean() >= 0.98, float(same.float().mean())
    kc = keys.double()[written] - center.double()
    o = rotate(kc, rot.double())
    y_got, y_ref = code_values(got_codes, d), code_values(ref_codes, d)
    cos = lambda y: (y * o).sum(-1) / (y.norm(dim=-1) * o.norm(dim=-1))  # noqa: E731
    assert (cos(y_got) >= cos(y_ref) - 1e-5).all()
    want_factor = kc.pow(2).sum(-1) / (y_got * o).sum(-1)
    assert torch.allclose(factor.cpu()[written].double(), want_factor, rtol=1e-5)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[written] = False
    assert (codes.cpu()[untouched] == 0x5A5A5A5A).all() and factor.cpu()[untouched].isnan().all()


@pytest.mark.parametrize("hq,hkv,d,bits", [(4, 2, 64, 3), (8, 1, 128, 2), (7, 1, 64, 4), (8, 2, 128, 4)])
def test_score_multi_bit_codes_matches_reference(hq, hkv, d, bits, fresh_seed):
    """The score pass sums the estimate over the codes' bit-planes: its stored logits are the
    reference's (``estimate_int``) within fp16 rounding, and so are its chunk maxima."""
    lens = [3000, 900, 200] if ON_GPU else [500, 200, 90]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed, centred=True, key_bits=bits)
    assert batch.codes.shape[-1] == bits * d // 32
    nc, sm = 3, d**-0.5
    plan = _plan(batch, nc, 16, 16)
    q_u, delta, qmin = quantize_query(batch.q.float().cpu(), batch.rot.cpu())
    (stored, stats), = _scores(batch, hq, hkv, d, nc, [(batch.codes, batch.factor, {})])
    stored = stored.cpu().double()
    group = hq // hkv
    for b in range(len(lens)):
        sink_end, score_end, chunk_len, _, work = (int(x) for x in plan[b, 1:6])
        for h in range(hkv):
            exact = _ref_logits(batch, b, h, group, q_u, delta, qmin, 16, 16, sm)
            heads = range(h * group, (h + 1) * group)
            got = torch.stack([stored[work * hq + qh * nc * chunk_len:][: score_end - sink_end] for qh in heads])
            assert torch.allclose(got, exact, rtol=1e-3, atol=1e-3)
            rows = slice((b * hq + h * group) * nc, (b * hq + (h + 1) * group) * nc)
            assert torch.equal(stats.max[rows].view(group, nc).cpu().double().max(-1).values, got.max(-1).values)


def test_encode_of_padding_only_writes_nothing():
    """A decode step's lazy-encode list is all -1 on most steps: those programs leave every code as it was."""
    h, d, n = 2, 64, 40
    keys = torch.randn(n, h, d, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(DEVICE)  # fixed: exact bits
    rot = random_rotation(d, seed=0, num_heads=h).to(DEVICE)
    codes = torch.full((n, h, d // 32), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)
    factor = torch.full((n, h), float("nan"), device=DEVICE)
    slots = torch.full((130,), -1, dtype=torch.int64, device=DEVICE)
    slots[100] = 7  # the third program has one key to encode
    encode_slots(keys, slots, rot, torch.zeros(h, d, device=DEVICE), codes, factor)
    ref_codes, ref_factor = encode_keys(keys[7:8].float().cpu(), rot.cpu())
    assert torch.equal(codes[7].cpu(), ref_codes[0]) and torch.allclose(factor[7].cpu(), ref_factor[0], rtol=1e-5)
    others = torch.arange(n, device=DEVICE) != 7
    assert (codes[others] == 0x5A5A5A5A).all() and factor[others].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_major", [False, True])  # contiguous; as the code pool stores them (code_buffers)
def test_encode_of_all_layers_in_one_launch_matches_each_layer(dtype, kv_major, fresh_seed):
    """Layer l's keys (a tensor of their own, as the KV pool keeps them) land in codes[l] and factor[l]
    with layer l's rotation and centre; padding and slots not listed keep their poison."""
    layers, h, d, n = 3, 2, 64, (2000 if ON_GPU else 70)
    keys = [torch.randn(n, h, d).to(dtype).to(DEVICE) for _ in range(layers)]
    rot = torch.stack([random_rotation(d, seed=fresh_seed + l, num_heads=h) for l in range(layers)])
    center = torch.randn(layers, h, d) * 0.1
    slots = torch.cat([torch.randperm(n)[: n // 2], torch.tensor([-1, -1])]).to(DEVICE)
    codes = torch.full((layers, n, h, d // 32), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)  # poison
    factor = torch.full((layers, n, h), float("nan"), device=DEVICE)
    if kv_major:
        codes, factor = code_buffers(n, h, d, DEVICE, layers)
        assert factor.stride(1) == 1 and codes.stride(2) == n * (d // 32)
        codes.fill_(0x5A5A5A5A)
        factor.fill_(float("nan"))
    encode_slots_all_layers(key_pointers(keys), keys[0], slots, rot.to(DEVICE), center.to(DEVICE), codes, factor)
    written = slots[slots >= 0].cpu()
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[written] = False
    for l in range(layers):
        k = keys[l].cpu().float()[written]
        ref_codes, ref_factor = encode_keys(k, rot[l], center[l])
        o = rotate(k.double() - center[l].double(), rot[l].double())
        sure = o.abs() >= 1e-5 * o.norm(dim=-1, keepdim=True)  # a component within rounding of 0 may go either way
        assert torch.equal(unpack_bits(codes[l].cpu()[written])[sure], unpack_bits(ref_codes)[sure]), f"layer {l}"
        assert torch.allclose(factor[l].cpu()[written], ref_factor, rtol=1e-5)
        assert (codes[l].cpu()[untouched] == 0x5A5A5A5A).all() and factor[l].cpu()[untouched].isnan().all()


def test_key_pointers_refuse_buffers_the_one_launch_cannot_address():
    k = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    other = torch.ones_like(k)
    assert key_pointers([k, other]).tolist() == [k.data_ptr(), other.data_ptr()]
    with pytest.raises(ValueError, match="same shape"):
        key_pointers([k, torch.zeros(8, 2, 128, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="cannot be encoded"):
        key_pointers([k.to(torch.int8)])


def _int4_from_table(qtable: torch.Tensor, group: int) -> torch.Tensor:
    """The INT4 query ``[B, Hq, D]`` whose nibble table ``qtable [B, Hkv, D // 4, 16, words]`` holds:
    the entries of one set bit are the levels themselves."""
    bsz, hkv, pos = qtable.shape[:3]
    one_bit = qtable[:, :, :, [1, 2, 4, 8]].contiguous().view(torch.uint8)[..., :group]  # [B, Hkv, D/4, 4, group]
    return one_bit.permute(0, 1, 4, 2, 3).reshape(bsz, hkv * group, pos * 4).to(torch.int64)


def _table(b: int, hq: int, hkv: int, d: int) -> torch.Tensor:
    """A nibble table for the kernels to fill, every byte poisoned."""
    return torch.full((b, hkv, d // 4, 16, table_words(hq // hkv)), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (7, 1), (3, 3)])  # (3, 3): one head a group
@pytest.mark.parametrize("whole_group", [False, True])  # heads per program: one, or the group
def test_prepare_query_matches_reference(d, hq, hkv, whole_group, fresh_seed):
    b = 3
    q = torch.randn(b, hq, d).to(torch.bfloat16)
    rot = random_rotation(d, seed=fresh_seed, num_heads=hkv)
    qscal = torch.full((b, hq, 3), float("nan"), device=DEVICE)
    qtable = _table(b, hq, hkv, d)
    prepare_query(q.to(DEVICE), rot.to(DEVICE), qscal, qtable, heads_per_program=hq // hkv if whole_group else 1)
    qu = _int4_from_table(qtable.cpu(), hq // hkv)
    # every entry holds the sums of its nibble's levels; the bytes of no head are left as they were
    words = qtable.shape[-1]
    ref_table = query_nibble_table(qu, hq // hkv).view(torch.uint8).view(b, hkv, d // 4, 16, 4 * words)
    got_table = qtable.cpu().view(torch.uint8).view(b, hkv, d // 4, 16, 4 * words)
    assert torch.equal(got_table[..., : hq // hkv], ref_table[..., : hq // hkv])
    assert (got_table[..., hq // hkv :] == 0x5A).all()
    ref_qu, delta, qmin = quantize_query(q.float(), rot)
    assert torch.allclose(qscal[..., 0].cpu(), delta, rtol=1e-5) and torch.allclose(qscal[..., 1].cpu(), qmin, rtol=1e-5, atol=1e-6)
    # rounding may differ only where (q' - min) / delta sits on a .5 boundary
    rq = rotate(q.float(), rot.repeat_interleave(hq // hkv, 0))
    scaled = (rq - qmin[..., None]) / delta[..., None]
    tie = (scaled - scaled.floor() - 0.5).abs() < 1e-4
    assert torch.equal(qu.int()[~tie], ref_qu[~tie])
    assert torch.equal(qscal[..., 2].cpu(), qu.float().sum(-1))


@pytest.mark.parametrize("chunk,bits", [(64, 1), (100, 1), (64, 3)])  # 100: a chunk that is not one encode block
@pytest.mark.parametrize("whole_group", [False, True])
def test_prepare_query_encodes_each_requests_pending_chunk(chunk, bits, whole_group, fresh_seed):
    """The lazy refresh rides on the query launch: request b's program per kv-head encodes the slots
    at ``pending[b * chunk : (b + 1) * chunk]`` exactly as ``encode_slots`` does, and nothing else."""
    b, hq, hkv, d, n = 3, 4, 2, 64, 400
    keys = torch.randn(n, hkv, d).to(torch.bfloat16).to(DEVICE)
    rot = random_rotation(d, seed=fresh_seed, num_heads=hkv).to(DEVICE)
    center = (torch.randn(hkv, d) * 0.1).to(DEVICE)
    pending = torch.full((b * chunk,), -1, dtype=torch.int64)
    pending[:chunk] = torch.randperm(n - 5)[:chunk]  # request 0: a full chunk
    pending[2 * chunk : 2 * chunk + 5] = torch.arange(5) + n - 5  # request 2: 5 slots (request 1: none)
    pending = pending.to(DEVICE)
    poison = dict(codes=torch.full((n, hkv, bits * d // 32), 0x5A5A5A5A, dtype=torch.int32, device=DEVICE),
                  factor=torch.full((n, hkv), float("nan"), device=DEVICE))
    got = {k: v.clone() for k, v in poison.items()}
    want = {k: v.clone() for k, v in poison.items()}
    q = torch.randn(b, hq, d).to(torch.bfloat16).to(DEVICE)
    qscal = torch.empty(b, hq, 3, device=DEVICE)
    prepare_query(q, rot, qscal, _table(b, hq, hkv, d), k_buf=keys, center=center, pending=pending,
                  heads_per_program=hq // hkv if whole_group else 1, **got)
    encode_slots(keys, pending, rot, center, want["codes"], want["factor"])
    assert torch.equal(got["codes"], want["codes"])
    assert torch.equal(got["factor"].isnan(), want["factor"].isnan())
    # the factor to float rounding: the interpreter's fp32 dot of a 64-key block can round a key's row
    # differently at another position in the block (a chunk of 100 splits into blocks unlike the flat
    # list's), seen at seed 1128928806
    assert torch.allclose(got["factor"].nan_to_num(), want["factor"].nan_to_num(), rtol=1e-6, atol=0)
    assert int((got["codes"] != 0x5A5A5A5A).any(-1).any(-1).sum()) == chunk + 5


@pytest.mark.parametrize("hq,hkv", [(8, 2), (14, 2)])  # (14, 2): a group of 7, padded to 8 rows a program
@pytest.mark.parametrize("whole_group", [False, True])
def test_prepare_query_sink_window_mass_matches_reference(hq, hkv, whole_group, fresh_seed):
    # top-p over the context: per query head, the exact log-mass of its request's sink and window
    d, sink, window = 64, 16, 32
    lens = [700, 260, 40]  # the last: no scored region, so no prior (-inf)
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed, centred=True)
    plan = _plan(batch, 3, sink, window)
    prior = torch.full((len(lens), hq), float("nan"), device=DEVICE)
    prepare_query(batch.q, batch.rot, torch.empty(len(lens), hq, 3, device=DEVICE), _table(len(lens), hq, hkv, d),
                  prior_lse=prior, k_buf=batch.k_buf, req_to_token=batch.req_to_token, plan=plan, center=batch.center,
                  prior_scale=0.3, heads_per_program=hq // hkv if whole_group else 1)
    for b in range(len(lens)):
        if plan[b, 2] <= plan[b, 1]:
            assert (prior[b] == float("-inf")).all()
            continue
        for h in range(hkv):
            heads = list(range(h * hq // hkv, (h + 1) * hq // hkv))
            ref = _sink_window_lse(batch, plan[b], b, h, heads, 0.3)
            assert torch.allclose(prior[b, heads].cpu().double(), ref.double(), rtol=1e-5, atol=1e-4), (b, h)


def _sink_window_lse(batch, plan_row, b, h, heads, scale):
    """Reference ``dense_region_lse`` of request ``b``'s sink and window (its plan row) for ``heads`` of
    kv-head ``h``."""
    rpi, sink_end, score_end, _, length = (int(x) for x in plan_row[:5])
    row = batch.req_to_token[rpi]
    always = torch.cat([row[:sink_end], row[score_end:length]]).long()  # only these keys leave the device
    return dense_region_lse(batch.q[b, heads].float().cpu(), batch.k_buf[always, h].cpu(), batch.center[h].cpu(), scale)


def test_prepare_query_random_rounding_is_unbiased():
    d, n = 64, (4096 if ON_GPU else 256)
    q = torch.randn(1, 1, d).expand(n, 1, d).contiguous()
    rot = torch.eye(d).view(1, d, d)
    qscal = torch.empty(n, 1, 3, device=DEVICE)
    qtable = _table(n, 1, 1, d)
    prepare_query(q.to(DEVICE), rot.to(DEVICE), qscal, qtable, torch.tensor([1234], device=DEVICE), "random")
    qu = _int4_from_table(qtable.cpu(), 1)
    deq = qscal[:, 0, 0:1].cpu() * qu[:, 0].float() + qscal[:, 0, 1:2].cpu()
    assert (qu != qu[0]).any()  # draws differ across rows
    step = float(qscal[0, 0, 0])
    assert torch.allclose(deq.mean(0), q[0, 0], atol=5 * step / math.sqrt(n))


def test_prepare_query_layouts_write_the_same_bytes(fresh_seed):
    """A program per query head or per kv-head group: the same draws (random rounding), tables and scalars."""
    b, hq, hkv, d = 2, 8, 2, 64
    q = torch.randn(b, hq, d).to(torch.bfloat16).to(DEVICE)
    rot = random_rotation(d, seed=fresh_seed, num_heads=hkv).to(DEVICE)
    seed = torch.tensor([fresh_seed], device=DEVICE)
    out = []
    for hpp in (1, hq // hkv):
        qscal, qtable = torch.full((b, hq, 3), float("nan"), device=DEVICE), _table(b, hq, hkv, d)
        prepare_query(q, rot, qscal, qtable, seed, "random", heads_per_program=hpp)
        out.append((qscal, qtable))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    with pytest.raises(ValueError, match="heads_per_program"):
        prepare_query(q, rot, out[0][0], out[0][1], heads_per_program=2)


def test_query_heads_per_program_follows_the_batch_bucket():
    # the Llama-3.1-8B shape on 132 SMs: a group a program once (request, kv-head) pairs fill the GPU
    assert [query_heads_per_program(bsz, 32, 8, 132) for bsz in (1, 8, 16, 17, 32)] == [1, 1, 1, 4, 4]
    for lo in (1, 2, 4, 8, 16, 32):  # constant over each power-of-two bucket, as CUDA graphs capture them
        assert len({query_heads_per_program(bsz, 14, 2, 132) for bsz in range(lo // 2 + 1, lo + 1)}) == 1


def _plan(batch, num_chunks, sink, window):
    bsz = batch.q.shape[0]
    plan = DecodePlan(bsz, int(batch.seq_lens.sum()) + bsz * num_chunks * CHUNK_ALIGN, DEVICE)
    return plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, sink, window, num_chunks)


def _ref_logits(batch, b, h_kv, group, q_u, delta, qmin, sink, window, sm_scale):
    from sglang_rabitq.reference import decode_regions

    n = int(batch.seq_lens[b])
    reg = decode_regions(n, int(batch.encoded_lens[b]), sink, window)
    row = batch.req_to_token[int(batch.req_pool_indices[b]), reg.sink_end : reg.score_end].long().cpu()
    codes, factor = batch.codes.cpu(), batch.factor.cpu()
    return torch.stack([
        estimate_int(codes[row, h_kv], factor[row, h_kv], q_u[b, qh], delta[b, qh], qmin[b, qh]) * sm_scale
        for qh in range(h_kv * group, (h_kv + 1) * group)
    ])


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (8, 1, 128), (3, 1, 64)])
@pytest.mark.parametrize("top_p,max_budget", [(0.8, 1.0), (0.95, 1.0), (0.95, 0.05), (1.0, 0.2)])
@pytest.mark.parametrize("nc", [3, 130])  # 130: more chunks than the threshold merges per load, many empty
def test_score_threshold_and_cap_match_reference(hq, hkv, d, top_p, max_budget, nc, fresh_seed):
    lens = [3000, 900, 200] if ON_GPU else [700, 300, 90]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    sink, window, sm = 16, 16, d**-0.5
    plan = _plan(batch, nc, sink, window)
    q_u, delta, qmin = quantize_query(batch.q.float().cpu(), batch.rot.cpu())
    qtable = query_nibble_table(q_u, hq // hkv).to(DEVICE)
    qscal = torch.stack([delta, qmin, q_u.float().sum(-1)], -1).contiguous().to(DEVICE)
    stats = ChunkStats(len(lens) * hq * nc, DEVICE)
    stored = torch.full(((sum(lens) + len(lens) * nc * CHUNK_ALIGN) * hq,),
                        float("nan"), dtype=torch.float16, device=DEVICE)  # poisoned
    score_chunks(qtable, qscal, batch.codes, batch.factor, batch.req_to_token, plan, stored, stats, sm, hkv, nc)
    thr = torch.full((len(lens), hq), float("nan"), device=DEVICE)
    head_max = torch.full((len(lens), hq), float("nan"), device=DEVICE)
    top_p_threshold(stats, thr, top_p, nc, head_max=head_max)
    top_p_thr = thr.clone()
    group = hq // hkv
    union_count = torch.full((len(lens) * hkv * nc, HIST_BINS), -7, dtype=torch.int32, device=DEVICE)  # poisoned
    if max_budget < 1.0:
        cap_union(stored, plan, thr, head_max, union_count, max_budget, hkv, nc)
    stored = stored.cpu().double()
    for b in range(len(lens)):
        sink_end, score_end, chunk_len, _, work = (int(x) for x in plan[b, 1:6])
        for h in range(hkv):
            exact = _ref_logits(batch, b, h, group, q_u, delta, qmin, sink, window, sm)
            # the kernel selects on its stored fp16 logits: they are the estimates, rounded once
            heads = range(h * group, (h + 1) * group)
            got = torch.stack([stored[work * hq + qh * nc * chunk_len:][: score_end - sink_end] for qh in heads])
            assert torch.allclose(got, exact, rtol=1e-3, atol=1e-3)
            logits = got
            # per chunk: its max, and the count of its tokens in each bin below its top bin
            rows = slice((b * hq + h * group) * nc, (b * hq + (h + 1) * group) * nc)
            cmax = stats.max[rows].view(group, nc).cpu().double()
            assert torch.equal(cmax.max(-1).values, logits.max(-1).values)
            for c in range(nc):
                lo, hi = c * chunk_len, min((c + 1) * chunk_len, score_end - sink_end)
                part = logits[:, lo:hi]
                got_count = stats.count[rows].view(group, nc, -1)[:, c].cpu()
                if part.shape[1] == 0:
                    assert (stats.max[rows].view(group, nc)[:, c] == float("-inf")).all()
                    continue
                assert torch.equal(cmax[:, c], part.max(-1).values)
                top = torch.floor(cmax[:, c] / BIN_WIDTH)
                k = (top[:, None] - torch.floor(part / BIN_WIDTH)).long()
                for g in range(group):
                    ref_count = torch.bincount(k[g][k[g] < HIST_BINS], minlength=HIST_BINS)
                    assert torch.equal(got_count[g], ref_count), (b, h, c, g)
            assert torch.equal(head_max[b, h * group : (h + 1) * group].cpu().double(), logits.max(-1).values)
            ref_thrs = hist_thresholds_at_ties(logits, top_p)
            got_thr = top_p_thr[b, h * group : (h + 1) * group].cpu().double()
            _assert_same_thresholds(logits, got_thr, ref_thrs, (b, h))
            if max_budget >= 1.0:
                continue
            # the cap, from the kernel's own top-p thresholds: per chunk the count of each rank bin ...
            keep = logits >= got_thr[:, None]
            rank = torch.where(keep, logits - logits.max(-1, keepdim=True).values, float("-inf")).max(0).values
            counts = union_count[(b * hkv + h) * nc : (b * hkv + h + 1) * nc].cpu()
            for c in range(nc):
                part = rank[c * chunk_len : min((c + 1) * chunk_len, score_end - sink_end)]
                k = torch.floor(-part[torch.isfinite(part)] / BIN_WIDTH).long()
                assert torch.equal(counts[c], torch.bincount(k[k < HIST_BINS], minlength=HIST_BINS)), (b, h, c)
            # ... and the raised thresholds
            ref_cap = union_cap_thresholds(logits, got_thr, max_budget, n=score_end - sink_end)
            _assert_same_thresholds(logits, thr[b, h * group : (h + 1) * group].cpu().double(), [ref_cap], (b, h, "cap"))


def _scores(batch, hq, hkv, d, nc, variants):
    """``score_chunks`` of ``batch`` once per ``(codes, factor, kwargs)`` of ``variants``, each into
    poisoned outputs: a list of (stored logits, stats)."""
    plan = _plan(batch, nc, 16, 16)
    q_u, delta, qmin = quantize_query(batch.q.float().cpu(), batch.rot.cpu())
    qtable = query_nibble_table(q_u, hq // hkv).to(DEVICE)
    qscal = torch.stack([delta, qmin, q_u.float().sum(-1)], -1).contiguous().to(DEVICE)
    out = []
    for codes, factor, kwargs in variants:
        stats = ChunkStats(batch.q.shape[0] * hq * nc, DEVICE)
        stats.max.fill_(float("nan"))
        stats.count.fill_(-7)
        stored = torch.full(((int(batch.seq_lens.sum()) + batch.q.shape[0] * nc * CHUNK_ALIGN) * hq,), float("nan"),
                            dtype=torch.float16, device=DEVICE)
        score_chunks(qtable, qscal, codes, factor, batch.req_to_token, plan, stored, stats, d**-0.5, hkv, nc, **kwargs)
        out.append((stored, stats))
    return out


def _assert_same_scores(a, b):
    (s_a, st_a), (s_b, st_b) = a, b
    assert torch.equal(s_a.isnan(), s_b.isnan()) and not s_a.isnan().all()
    assert torch.equal(s_a.nan_to_num(), s_b.nan_to_num())
    assert torch.equal(st_a.max, st_b.max) and torch.equal(st_a.top, st_b.top)
    assert torch.equal(st_a.count, st_b.count)


@pytest.mark.skipif(not (ON_GPU and mma_estimate(torch.device(DEVICE))), reason="needs a GPU with the 1-bit MMA")
@pytest.mark.parametrize("hq,hkv,d,bits", [(3, 3, 64, 1), (4, 2, 64, 1), (32, 8, 128, 1), (12, 2, 128, 1),
                                           (14, 2, 64, 1), (8, 1, 128, 1),
                                           (32, 8, 128, 2), (12, 2, 128, 3), (14, 2, 64, 3), (8, 1, 128, 4)])
def test_score_tensor_core_estimate_equals_nibble_table(hq, hkv, d, bits, fresh_seed):
    # both sum the same integers <u, q_u> (one MMA or table walk per bit-plane) and apply the same
    # float formula: the same stored logits, maxima and bin counts, bit for bit (poisoned outputs:
    # every element is written by both)
    batch = make_batch([3000, 517, 130], hq, hkv, d, DEVICE, seed=fresh_seed, key_bits=bits)
    variants = [(batch.codes, batch.factor, dict(mma=mma)) for mma in (True, False)]
    _assert_same_scores(*_scores(batch, hq, hkv, d, 5, variants))


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (14, 2, 64)])
def test_score_reads_codes_and_factors_through_their_strides(hq, hkv, d, fresh_seed):
    # the same codes and factors stored kv-head-major (each kv-head's slots contiguous) score the same
    batch = make_batch([3000, 517] if ON_GPU else [600, 130], hq, hkv, d, DEVICE, seed=fresh_seed)
    codes_kv = batch.codes.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    factor_kv = batch.factor.t().contiguous().t()
    assert factor_kv.stride(1) != 1 and codes_kv.stride(1) != batch.codes.stride(1)
    _assert_same_scores(*_scores(batch, hq, hkv, d, 3, [(batch.codes, batch.factor, {}), (codes_kv, factor_kv, {})]))


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (14, 2, 64)])
def test_score_with_64_bit_offsets_equals_32_bit(hq, hkv, d, fresh_seed, monkeypatch):
    # a pool past 2**31 code words is addressed with 64-bit offsets: the same logits, maxima and counts
    batch = make_batch([3000, 517] if ON_GPU else [600, 130], hq, hkv, d, DEVICE, seed=fresh_seed)
    variants = [(batch.codes, batch.factor, {})]
    narrow = _scores(batch, hq, hkv, d, 3, variants)[0]
    monkeypatch.setattr(score_module, "offsets_fit_32", lambda *buffers: False)
    _assert_same_scores(narrow, _scores(batch, hq, hkv, d, 3, variants)[0])


def test_offsets_fit_32_bounds_the_largest_offset_not_the_element_count():
    # meta tensors: the shapes and strides of large pools, no memory
    fits = torch.empty(2**31 - 1, device="meta")
    assert offsets_fit_32(fits, fits[::2]) and not offsets_fit_32(torch.empty(2**31, device="meta"))
    # one kv-head's rows of a wide K buffer: 2**23 + 128 elements, the last at offset 2**31 + 127
    rows = torch.empty_strided((2**16 + 1, 128), (2**15, 1), device="meta")
    assert rows.numel() < 2**31 and not offsets_fit_32(rows)


def test_chunks_double_from_large_batch_buckets(monkeypatch):
    # 16 programs per SM, 32 from LARGE_BATCH_PAIRS (request, kv-head) pairs in a batch's power-of-two
    # bucket; the same count across a bucket (CUDA graphs replay a batch padded to its bucket)
    sms, ctx = 132, 131072
    assert chunks_for_batch(8, 8, ctx, sms) == triton.cdiv(16 * sms, 64)
    assert chunks_for_batch(32, 8, ctx, sms) == triton.cdiv(32 * sms, 256)
    assert chunks_for_batch(17, 8, ctx, sms) == chunks_for_batch(32, 8, ctx, sms)
    assert chunks_for_batch(16, 2, ctx, sms) == triton.cdiv(16 * sms, 32)
    assert chunks_for_batch(32, 8, 1024, sms) == 4  # none shorter than 2 blocks
    monkeypatch.setattr(decode, "PROGRAMS_PER_SM", 8)  # a fixed target overrides the rule (--programs-per-sm)
    assert chunks_for_batch(32, 8, ctx, sms) == triton.cdiv(8 * sms, 256)


@triton.jit
def _bins_between_kernel(hi_ptr, lo_ptr, out_ptr, N: tl.constexpr, BIN_W: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, bins_between(tl.load(hi_ptr + offs), tl.load(lo_ptr + offs), BIN_W))


def test_bins_between_is_exact_where_the_fp32_difference_rounds(fresh_seed):
    """The cap's rank bin of a token, floor((m - lg) / BIN_WIDTH) for fp16 m >= lg, as the float64
    reference has it. Seen on the GPU (1 run in ~20): a head max of a few fp16 ulps from 0 against a
    logit on a bin edge, where m - lg in fp32 rounds onto the edge and moved tokens one bin."""
    gen = torch.Generator().manual_seed(fresh_seed)
    n = 256
    lo = (torch.randn(n, generator=gen) * 6).half()
    hi = (lo.float() + torch.rand(n, generator=gen) * 16).half()
    # the edge cases: tiny maxima (fp16 subnormals and small normals) against logits on bin edges
    tiny = torch.tensor([2.0**-24, -(2.0**-24), 3 * 2.0**-24, -(2.0**-16), 2.0**-14, -(2.0**-14)])
    edges = -BIN_WIDTH * torch.randint(1, 60, (n // 2,), generator=gen).float()
    hi[: n // 2] = tiny[torch.randint(0, len(tiny), (n // 2,), generator=gen)].half()
    lo[: n // 2] = torch.minimum(edges, hi[: n // 2].float()).half()
    exact = torch.floor((hi.double() - lo.double()) / BIN_WIDTH).long()
    naive = torch.floor((hi.float() - lo.float()) / BIN_WIDTH).long()
    assert (naive != exact).any()  # the cases bite: an fp32 difference gets some of them wrong
    out = torch.empty(n, dtype=torch.int32, device=DEVICE)
    _bins_between_kernel[(1,)](hi.float().to(DEVICE), lo.float().to(DEVICE), out, N=n, BIN_W=BIN_WIDTH)
    assert torch.equal(out.cpu().long(), exact)


# The threshold kernel sums bin masses in fp32: where the cumulative mass meets p's target within fp32
# rounding (seen: relative 7e-8), either of the two bins is right. The reference at p (1 -+ P_TIE) spans both.
P_TIE = 1e-6


def hist_thresholds_at_ties(logits, p, prior_lse=None):
    return [hist_threshold(logits, q, prior_lse=prior_lse) for q in sorted({p, p * (1 - P_TIE), min(p * (1 + P_TIE), 1.0)})]


def _assert_same_thresholds(logits, got_thr, ref_thrs, where):
    """Per head, the threshold of one of ``ref_thrs``, or its kept set (a float-rounding move inside a gap)."""
    for g in range(logits.shape[0]):
        same = [torch.equal(logits[g] >= got_thr[g] - 1e-6, logits[g] >= ref[g]) or abs(float(got_thr[g] - ref[g])) < 1e-3
                for ref in ref_thrs]
        assert any(same), (*where, g, float(got_thr[g]), [float(ref[g]) for ref in ref_thrs])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("num_parts", [5, 300])  # 300: more partials than the merge reads per load
def test_merge_is_the_log_sum_exp_mean_of_the_partials(d, num_parts, fresh_seed):
    assert num_parts < 100 or num_parts > merge_constexprs(num_parts, d)["BLOCK_P"]
    g = torch.Generator().manual_seed(fresh_seed)
    bsz, hq = 2, 3
    part = torch.randn(bsz * hq * num_parts, d, generator=g)
    lse = torch.randn(bsz * hq * num_parts, generator=g) * 4
    empty = torch.rand(lse.shape, generator=g) < 0.3  # an empty partial: zeros, log-mass -inf
    part[empty], lse[empty] = 0.0, float("-inf")
    lse.view(bsz, hq, num_parts)[1, 2] = float("-inf")  # a head with nothing to attend
    part.view(bsz, hq, num_parts, d)[1, 2] = 0.0
    out = torch.full((bsz, hq, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # poisoned
    merge_partials(part.to(DEVICE), lse.to(DEVICE), out, num_parts)
    w = torch.softmax(lse.view(bsz, hq, num_parts, 1).double(), dim=2).nan_to_num(0.0)
    ref = (w * part.view(bsz, hq, num_parts, d).double()).sum(2)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-2, atol=1e-2)
    assert (out[1, 2] == 0).all()


def _check_decode_stages(batch, ws, query, sink, window, score_scale, top_p, kept, scope="context", max_budget=1.0):
    """Stage by stage, on what a decode launch left in its workspace: the sink/window mass (top-p
    over the context), the stored logits are the estimates, the thresholds are the histogram rule's
    on them, and the attended counts are the tokens at or above a threshold of the group plus the
    sink and window (so a failure names its stage)."""
    bsz, hq = ws.thr[: len(batch.seq_lens)].shape
    hkv = batch.k_buf.shape[1]
    group, nc = hq // hkv, ws.num_chunks(bsz)
    q_u, delta, qmin = query
    stored, thr = ws.logits.cpu().double(), ws.thr[:bsz].cpu().double()
    prior_all = ws.prior[:bsz].cpu().double()
    for b in range(bsz):
        _, sink_end, score_end, chunk_len, length, work = (int(x) for x in ws.plan.rows[b, :6])
        for h in range(hkv):
            heads = range(h * group, (h + 1) * group)
            prior = None
            if scope == "context" and score_end > sink_end:
                ref_prior = _sink_window_lse(batch, ws.plan.rows[b], b, h, list(heads), score_scale)
                prior = prior_all[b, list(heads)]
                assert torch.allclose(prior, ref_prior, rtol=1e-5, atol=1e-4), ("sink/window mass", b, h)
            got = torch.stack([stored[work * hq + qh * nc * chunk_len:][: score_end - sink_end] for qh in heads])
            exact = _ref_logits(batch, b, h, group, q_u, delta, qmin, sink, window, score_scale)
            assert torch.allclose(got, exact, rtol=1e-3, atol=1e-3), ("stored logits", b, h)
            ref_thrs = hist_thresholds_at_ties(got, top_p, prior_lse=prior)
            if max_budget < 1.0:
                ref_thrs = [union_cap_thresholds(got, ref, max_budget, n=score_end - sink_end) for ref in ref_thrs]
            for g, qh in enumerate(heads):
                same_set = any(torch.equal(got[g] >= thr[b, qh], got[g] >= ref[g]) for ref in ref_thrs)
                assert same_set, ("threshold", b, h, g, float(thr[b, qh]), [float(ref[g]) for ref in ref_thrs])
            selected = (got >= thr[b, list(heads)][:, None]).any(0).sum()
            assert int(kept[b, h]) == int(selected) + length - (score_end - sink_end), ("compaction", b, h)


@pytest.mark.parametrize("hq,hkv,d,temperature,scope,max_budget,bits", [
    (4, 2, 64, 1.0, "context", 1.0, 1), (8, 1, 128, 0.6, "context", 1.0, 1), (14, 2, 64, 0.6, "context", 1.0, 1),
    (4, 2, 64, 1.0, "scored", 1.0, 1), (8, 2, 64, 1.0, "scored", 0.05, 1),
    (14, 2, 64, 0.6, "scored", 1.0, 3), (8, 1, 128, 1.0, "context", 1.0, 2),  # multi-bit key codes
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_layer_matches_reference(hq, hkv, d, temperature, scope, max_budget, bits, dtype, fresh_seed):
    lens = [5000, 1500, 70, 3] if ON_GPU else [600, 260, 70, 3]
    encoded = [lens[0] - 40, lens[1], lens[2], lens[3]]  # request 0 has a lazy (unencoded) tail
    batch = make_batch(lens, hq, hkv, d, DEVICE, dtype=dtype, encoded=encoded, seed=fresh_seed, centred=True,
                       key_bits=bits)
    sink, window, sm, top_p = 16, 32, d**-0.5, 0.9
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens) + 8, DEVICE)
    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, sink, window, ws.num_chunks(len(lens)))
    out = torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=dtype)
    rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                        batch.req_to_token, ws, out, sm_scale=sm, top_p=top_p, score_temperature=temperature,
                        top_p_scope=scope, center=batch.center, max_budget=max_budget)
    cpu = {k: v.cpu() for k, v in vars(batch).items()}
    # the reference selects from the kernel's INT4 query (test_prepare_query_matches_reference checks
    # it): a level that rounds the other way on a .5 edge shifts every estimate and can move a bin
    n = len(lens)
    query = (_int4_from_table(ws.qtable[:n].cpu(), hq // hkv).int(), ws.qscal[:n, :, 0].cpu(), ws.qscal[:n, :, 1].cpu())
    ref, attended = rabitq_decode(cpu["q"].float(), cpu["k_buf"], cpu["v_buf"], cpu["codes"], cpu["factor"], cpu["rot"],
                                  cpu["req_to_token"], cpu["req_pool_indices"], cpu["seq_lens"], cpu["encoded_lens"],
                                  top_p=top_p, sink=sink, window=window, sm_scale=sm, score_temperature=temperature,
                                  query=query, top_p_scope=scope, center=cpu["center"], max_budget=max_budget)
    assert not out.isnan().any()
    kept = ws.kept_tokens(len(lens)).cpu()
    _check_decode_stages(batch, ws, query, sink, window, sm * temperature, top_p, kept, scope, max_budget)
    for b in range(len(lens)):
        for h in range(hkv):
            n_ref = len(attended[b][h])
            assert abs(int(kept[b, h]) - n_ref) <= max(2, n_ref // 100), (b, h, int(kept[b, h]), n_ref)
    assert torch.allclose(out.float().cpu(), ref, atol=3e-2, rtol=2e-2)
    if temperature == 1.0:  # (a flattened estimate over 7-8 heads on this short a context keeps ~all)
        assert kept[0].max() < lens[0]  # sparse: the long request skipped tokens


@pytest.mark.parametrize("launch", [dict(block_n=32), dict(block_n=128, num_warps=2, num_stages=2)])
def test_attention_launch_configurations_attend_the_same_tokens(launch, fresh_seed, monkeypatch):
    """Gather blocks, warps and stages change the order of the sums, not the tokens: the same counts,
    and outputs equal to the default launch's within rounding."""
    from sglang_rabitq.kernels.sparse_attention import attention_launch

    hq, hkv, d = 8, 2, 128
    lens = [5000, 1500, 70, 3] if ON_GPU else [700, 260, 70, 3]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed, centred=True)
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens) + 8, DEVICE)
    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.seq_lens, 16, 32, ws.num_chunks(len(lens)))
    outs, kept = [], []
    for cfg in (None, {**attention_launch(hq // hkv, d), **launch}):
        monkeypatch.setattr(decode, "ATTENTION_LAUNCH", cfg)
        out = torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=batch.q.dtype)
        rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot, batch.req_to_token,
                            ws, out, sm_scale=d**-0.5, top_p=0.9, center=batch.center)
        outs.append(out.float().cpu())
        kept.append(ws.kept_tokens(len(lens)).cpu().clone())
    assert not outs[1].isnan().any()
    assert torch.equal(kept[0], kept[1])
    assert kept[0][0].max() < lens[0]  # sparse: the long request skipped tokens
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)


def test_attention_launch_refuses_unknown_settings():
    from sglang_rabitq.kernels.sparse_attention import sparse_attention

    with pytest.raises(TypeError, match="block_size"):
        q, kv = torch.zeros(1, 2, 64), torch.zeros(8, 1, 64)  # its settings are checked before any launch
        sparse_attention(q, kv, kv, *([None] * 8), 1.0, 1, False, block_size=32)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (8, 8, 128)])
def test_dense_layer_and_top_p_one_equal_dense_attention(hq, hkv, d, fresh_seed):
    from sglang_rabitq.reference import dense_decode_attention

    lens = [4000, 33] if ON_GPU else [400, 33]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    ws = DecodeWorkspace(2, hq, hkv, d, max(lens), DEVICE)
    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 8, 8, ws.num_chunks(2))
    for kwargs in (dict(dense=True, top_p=0.5), dict(dense=False, top_p=1.0)):
        out = torch.empty(2, hq, d, device=DEVICE, dtype=torch.bfloat16)
        rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=0.1, **kwargs)
        for b, n in enumerate(lens):
            slots = batch.req_to_token[int(batch.req_pool_indices[b]), :n].long()
            ref = dense_decode_attention(batch.q[b].float(), batch.k_buf[slots].float(), batch.v_buf[slots].float(), 0.1)
            assert torch.allclose(out[b].float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.equal(ws.kept_tokens(2).cpu(), torch.tensor(lens).view(2, 1).expand(2, hkv))


def test_requests_past_the_workspace_attend_densely(fresh_seed):
    """The plan's per-token buffers hold ``capacity`` tokens: the request that would pass it (and
    every later one) gets an empty scored region, so it attends all its tokens, exactly."""
    from sglang_rabitq.reference import dense_decode_attention

    hq, hkv, d, lens = 4, 2, 64, [300, 700, 90]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens), DEVICE)
    ws.plan.capacity = 400  # request 0 fits, request 1 would not
    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 16, 16, ws.num_chunks(len(lens)))
    assert int(ws.plan.overflow) == 2
    out = torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                        batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.5)
    kept = ws.kept_tokens(len(lens)).cpu()
    assert (kept[0] < lens[0]).all()  # sparse
    for b in (1, 2):
        assert (kept[b] == lens[b]).all()
        slots = batch.req_to_token[int(batch.req_pool_indices[b]), : lens[b]].long()
        ref = dense_decode_attention(batch.q[b].float(), batch.k_buf[slots].float(), batch.v_buf[slots].float(), d**-0.5)
        assert torch.allclose(out[b].float(), ref, atol=2e-2, rtol=2e-2)


def test_a_padding_row_does_not_change_the_other_rows_bits(fresh_seed):
    """CUDA-graph replay pads a batch up to a captured size with rows of length 1: the real rows'
    outputs must be bit-identical to the unpadded batch's (graphs on and off agree)."""
    hq, hkv, d, lens = 4, 1, 64, [600, 260, 70]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    # few SMs and a long max context: the chunk count would differ between 3 and 4 rows
    ws = DecodeWorkspace(4, hq, hkv, d, 4096, DEVICE, num_sms=1)
    outs = []
    for rows in (3, 4):
        pad = rows - len(lens)
        rpi = torch.cat([batch.req_pool_indices, torch.zeros(pad, dtype=batch.req_pool_indices.dtype, device=DEVICE)])
        seq = torch.cat([batch.seq_lens, torch.ones(pad, dtype=batch.seq_lens.dtype, device=DEVICE)])
        q = torch.cat([batch.q, batch.q[:pad]])
        ws.plan.fill(rpi, seq, seq, 16, 16, ws.num_chunks(rows))
        out = torch.full((rows, hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        rabitq_decode_layer(q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.9)
        outs.append(out[: len(lens)])
    assert torch.equal(outs[0], outs[1])


def test_a_requests_selection_does_not_depend_on_its_batch(fresh_seed):
    """Alone or among 15 other requests (other chunks: the chunk count follows the batch size), a
    request keeps the same thresholds and the same tokens; only the split of its attention moves."""
    hq, hkv, d = 4, 1, 64
    batch = make_batch([600, 90], hq, hkv, d, DEVICE, seed=fresh_seed)
    ws = DecodeWorkspace(16, hq, hkv, d, 4096, DEVICE, num_sms=1)  # 5 chunks alone, 1 in a batch of 16
    got = []
    for rows in (1, 16):
        idx = torch.tensor([0] + [1] * (rows - 1), device=DEVICE)
        ws.plan.fill(batch.req_pool_indices[idx], batch.seq_lens[idx], batch.encoded_lens[idx], 16, 16, ws.num_chunks(rows))
        out = torch.full((rows, hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        rabitq_decode_layer(batch.q[idx], batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.9)
        got.append((ws.num_chunks(rows), ws.thr[0].clone(), ws.kept_tokens(rows)[0].clone(), out[0].float()))
    (nc1, thr1, kept1, out1), (nc16, thr16, kept16, out16) = got
    assert nc1 != nc16
    assert torch.equal(thr1, thr16) and torch.equal(kept1, kept16)
    assert torch.allclose(out1, out16, atol=1e-2, rtol=1e-2)


@GPU
def test_decode_step_replays_in_a_cuda_graph_bit_identically(fresh_seed):
    """Captured once, replayed on a new plan (other lengths, another budget): same bits as eager."""
    hq, hkv, d, lens = 8, 2, 128, [3000, 1200, 77]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens) + 8, DEVICE)
    nc = ws.num_chunks(len(lens))
    eager, graphed = (torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    top_p = torch.tensor([0.9])

    def step(out):
        rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=float(top_p), score_temperature=0.6)

    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 16, 32, nc)
    step(graphed)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    # a new batch state: shorter requests, a lazy tail; the plan is refilled outside the graph
    seq = batch.seq_lens - torch.tensor([500, 7, 30], device=DEVICE)
    enc = seq - torch.tensor([40, 0, 0], device=DEVICE)
    ws.plan.fill(batch.req_pool_indices, seq, enc, 16, 32, nc)
    graph.replay()
    kept_graph = ws.kept_tokens(len(lens)).clone()
    step(eager)
    torch.cuda.synchronize()
    assert not graphed.isnan().any()
    assert torch.equal(graphed, eager)
    assert torch.equal(kept_graph, ws.kept_tokens(len(lens)))


@pytest.mark.skipif(not (ON_GPU and launch_chain.programmatic_launch(torch.device(DEVICE))),
                    reason="needs a CUDA GPU with griddepcontrol (sm_90 on)")
def test_chained_launches_give_the_bits_of_plain_launches(fresh_seed, monkeypatch):
    """The step's kernels launched as a programmatic chain (each waits for the one before inside the
    kernel) against plain launches, eagerly and replayed from a CUDA graph, with the cap's two launches."""
    hq, hkv, d, lens = 8, 2, 128, [3000, 1200, 77]
    batch = make_batch(lens, hq, hkv, d, DEVICE, seed=fresh_seed)
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens) + 8, DEVICE)
    ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 16, 32, ws.num_chunks(len(lens)))

    def step(out):
        rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.95, max_budget=0.2)

    results = []
    for chained in (False, True):
        monkeypatch.setattr(launch_chain, "ENABLED", chained)
        eager, graphed = (torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
                          for _ in range(2))
        step(eager)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(graphed)
        graph.replay()
        torch.cuda.synchronize()
        results.append((eager, graphed, ws.kept_tokens(len(lens)).clone()))
    (plain, plain_graph, plain_kept), (chain, chain_graph, chain_kept) = results
    assert not plain.isnan().any()
    assert torch.equal(plain_kept, chain_kept)
    for out in (plain_graph, chain, chain_graph):
        assert torch.equal(out, plain)


def _poison_workspace(ws: DecodeWorkspace) -> None:
    """Garbage in every scratch buffer, as if another batch had just used them."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for t in [*vars(ws).values(), ws.stats.max, ws.stats.top, ws.stats.count]:
        if isinstance(t, torch.Tensor) and all(t is not c for c in (ws.seed, ws.plan.rows, ws.zero_center)):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, device=DEVICE).to(t.dtype) * 1e4)
                t.view(-1)[::7] = float("nan")
            else:
                t.copy_(torch.randint(-2**30, 2**30, t.shape, generator=g, device=DEVICE).to(t.dtype))


def test_decode_layer_output_does_not_depend_on_stale_workspace(fresh_seed):
    """A server reuses one workspace for every layer and step: no result may depend on what an
    earlier launch left in it (a history-dependent read makes greedy output unrepeatable)."""
    hq, hkv, d = 8, 2, 64
    lens = [5000, 1500, 70, 3] if ON_GPU else [600, 260, 70, 3]
    encoded = [lens[0] - 40, lens[1], lens[2], lens[3]]
    batch = make_batch(lens, hq, hkv, d, DEVICE, encoded=encoded, seed=fresh_seed)
    ws = DecodeWorkspace(len(lens), hq, hkv, d, max(lens) + 8, DEVICE)
    runs = []
    for poison in (False, True):
        if poison:
            _poison_workspace(ws)
        ws.plan.fill(batch.req_pool_indices, batch.seq_lens, batch.encoded_lens, 16, 32, ws.num_chunks(len(lens)))
        out = torch.full((len(lens), hq, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        rabitq_decode_layer(batch.q, batch.k_buf, batch.v_buf, batch.codes, batch.factor, batch.rot,
                            batch.req_to_token, ws, out, sm_scale=d**-0.5, top_p=0.9, score_temperature=0.6)
        runs.append((out.clone(), ws.kept_tokens(len(lens)).clone()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
