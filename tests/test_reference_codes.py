import math

import pytest
import torch

from sglang_rabitq.reference import (
    code_values,
    encode_keys,
    estimate_float,
    estimate_int,
    pack_bits,
    query_nibble_table,
    quantize_query,
    random_rotation,
    rotate,
    unpack_bits,
    unpack_levels,
)
from sglang_rabitq.reference.estimator_stats import estimator_errors, rabitq_error_bound


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_rotation_is_orthogonal_and_seeded(dim):
    r = random_rotation(dim, seed=7, num_heads=3)
    eye = torch.eye(dim)
    for h in range(3):
        assert torch.allclose(r[h] @ r[h].T, eye, atol=1e-5)
    assert torch.equal(r, random_rotation(dim, seed=7, num_heads=3))
    assert not torch.allclose(r, random_rotation(dim, seed=8, num_heads=3))
    assert not torch.allclose(r[0], r[1])


def test_rotation_preserves_inner_products_in_one_frame():
    # keys and queries must be rotated the same way: <Pq, Pk> = <q, k>
    r = random_rotation(64, seed=1, num_heads=2)
    x, y = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    assert torch.allclose((rotate(x, r) * rotate(y, r)).sum(-1), (x * y).sum(-1), atol=1e-4)


def test_pack_bits_layout_known_values():
    bits = torch.zeros(64, dtype=torch.bool)
    bits[[0, 3, 31, 32, 63]] = True
    words = pack_bits(bits)
    assert words.dtype == torch.int32
    assert words.tolist() == [1 + 8 - 2**31, 1 - 2**31]
    assert torch.equal(unpack_bits(words).bool(), bits)


def test_encode_known_key_bit_exact():
    # identity rotation: bits are the signs of the centred key itself, factor = |k|^2 / |k|_1
    d = 32
    k = torch.tensor([(-1.0) ** i * (i + 1) for i in range(d)]).view(1, 1, d)
    codes, factor = encode_keys(k, torch.eye(d).view(1, d, d))
    expected = sum(1 << i for i in range(0, d, 2))  # positive at even dims
    assert codes.view(-1).tolist() == [expected - 2**32 if expected >= 2**31 else expected]
    assert factor.item() == pytest.approx(float((k * k).sum() / k.abs().sum()), rel=1e-6)


def test_encode_centering_and_zero_key():
    d = 64
    rot = random_rotation(d, seed=3)
    center = torch.randn(1, d)
    k = torch.stack([center[0], center[0] + torch.randn(d)]).view(2, 1, d)
    codes, factor = encode_keys(k, rot, center)
    assert factor[0, 0] == 0  # k == center: estimate must be exactly 0
    c2, f2 = encode_keys(k - center, rot)
    assert torch.equal(codes[1], c2[1]) and torch.allclose(factor[1], f2[1])


@pytest.mark.parametrize("dim", [64, 128])
def test_integer_form_equals_float_form(dim, fresh_seed):
    rot = random_rotation(dim, seed=fresh_seed, num_heads=2)
    keys = torch.randn(50, 2, dim)
    codes, factor = encode_keys(keys, rot)
    q = torch.randn(3, 4, dim)  # 4 query heads on 2 kv heads
    q_u, delta, qmin = quantize_query(q, rot)
    for b in range(3):
        for qh in range(4):
            h = qh // 2
            q_bar = delta[b, qh].double() * q_u[b, qh].double() + qmin[b, qh].double()
            f = estimate_float(codes[:, h], factor[:, h], q_bar)
            i = estimate_int(codes[:, h], factor[:, h], q_u[b, qh], delta[b, qh], qmin[b, qh])
            assert torch.allclose(f, i, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1), (8, 1), (12, 2)])  # 1-2 words an entry, unused bytes
def test_nibble_table_sums_give_the_inner_product(hq, hkv, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    d, n, group = 64, 40, hq // hkv
    q_u = torch.randint(0, 16, (2, hq, d), generator=gen)
    q_u[0, 0] = 15  # the largest entries: 4 x 15 in every byte
    codes = torch.randint(-(2**31), 2**31, (n, d // 32), generator=gen, dtype=torch.int64).to(torch.int32)
    table = query_nibble_table(q_u, group)
    words = (group + 3) // 4
    assert table.shape == (2, hkv, d // 4, 16, words) and table.dtype == torch.int32
    lanes = table.view(torch.uint8).view(2, hkv, d // 4, 16, 4 * words).long()
    assert (lanes[..., group:] == 0).all() and lanes.max() <= 60
    nibbles = (unpack_bits(codes).view(n, d // 4, 4) * torch.tensor([1, 2, 4, 8])).sum(-1)  # [N, D/4]
    for b in range(2):
        for qh in range(hq):
            entries = lanes[b, qh // group, torch.arange(d // 4), nibbles, qh % group]  # [N, D/4]
            want = (unpack_bits(codes).long() * q_u[b, qh]).sum(-1)
            assert torch.equal(entries.sum(-1), want)
    with pytest.raises(ValueError, match="groups of 1-8"):
        query_nibble_table(torch.zeros(1, 9, d, dtype=torch.long), 9)


def test_query_quantization_range_and_degenerate():
    rot = torch.eye(32).view(1, 32, 32)
    q = torch.linspace(-1, 1, 32).view(1, 1, 32)
    q_u, delta, qmin = quantize_query(q, rot)
    assert q_u.min() == 0 and q_u.max() == 15
    assert delta.item() == pytest.approx(2 / 15) and qmin.item() == pytest.approx(-1)
    flat = torch.full((1, 1, 32), 0.5)
    q_u, delta, qmin = quantize_query(flat, rot)
    assert delta.item() == 0 and q_u.abs().sum() == 0 and qmin.item() == 0.5


def test_randomized_rounding_is_unbiased():
    rot = torch.eye(32).view(1, 32, 32)
    q = torch.randn(1, 1, 32)
    rq = q[0, 0]
    acc = torch.zeros(32, dtype=torch.float64)
    n = 4000
    for _ in range(n):
        q_u, delta, qmin = quantize_query(q, rot, rounding="random")
        acc += (delta[0, 0] * q_u[0, 0] + qmin[0, 0]).double()
    step = float(delta[0, 0])
    assert torch.allclose(acc / n, rq.double(), atol=4 * step / math.sqrt(n) + 1e-6)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("rounding", ["none", "nearest", "random"])
@pytest.mark.parametrize("cosine", [0.0, 0.6])
def test_estimator_unbiased_with_rabitq_std(dim, rounding, cosine):
    trials = 1500
    err = estimator_errors(dim, cosine, rounding, trials, seed=dim + int(cosine * 10))
    bound = rabitq_error_bound(dim, cosine)
    std = float(err.std())
    assert abs(float(err.mean())) < 4 * std / math.sqrt(trials)  # unbiased
    upper = 1.12 if rounding == "none" else 1.30  # INT4 adds a little quantization noise
    assert 0.88 * bound < std < upper * bound, (std, bound)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: random_rotation(48, seed=0),
        lambda: encode_keys(torch.randn(2, 1, 40), torch.eye(40).view(1, 40, 40)),
        lambda: encode_keys(torch.randn(2, 1, 32), torch.eye(32).view(1, 32, 32), torch.zeros(2, 32)),
        lambda: encode_keys(torch.randn(2, 32), torch.eye(32).view(1, 32, 32)),
        lambda: quantize_query(torch.randn(1, 3, 32), torch.eye(32).expand(2, 32, 32)),
        lambda: quantize_query(torch.randn(1, 2, 32), torch.eye(32).expand(2, 32, 32), rounding="up"),
    ],
)
def test_bad_input_is_rejected(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_multi_bit_codes_layout_and_exact_self_product(bits, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    keys = torch.randn(40, 2, 64, generator=gen) * 3
    rot, center = random_rotation(64, fresh_seed, 2), torch.randn(2, 64, generator=gen) * 0.1
    codes, factor = encode_keys(keys, rot, center, bits=bits)
    assert codes.shape == (40, 2, bits * 2) and codes.dtype == torch.int32
    levels = unpack_levels(codes, 64)
    assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    assert (levels == 0).any() and (levels == 2**bits - 1).any()  # the grid is used end to end
    # plane j of the words is bit j of every level
    assert torch.equal(unpack_bits(codes[..., 2:4]), (levels >> 1) & 1)
    kc = keys.double() - center.double()
    o = rotate(kc, rot.double())
    y = code_values(codes, 64)
    assert torch.equal(y, (2 * levels - (2**bits - 1)).double())
    # the factor makes the estimate exact for the key itself: g <y, o> = ||k_c||^2
    assert torch.allclose(factor.double() * (y * o).sum(-1), kc.pow(2).sum(-1), rtol=1e-5)
    # the chosen grid scale is the best of those tried: no other scale's grid is closer in angle to o
    cos = (y * o).sum(-1) / (y.norm(dim=-1) * o.norm(dim=-1))
    half, amax = 2 ** (bits - 1), o.abs().amax(-1, keepdim=True)
    for t in torch.linspace(0.5, 2.5, 64, dtype=torch.float64) * half:
        yt = 2 * torch.clamp(torch.floor(o * t / amax), -half, half - 1) + 1
        assert ((yt * o).sum(-1) / (yt.norm(dim=-1) * o.norm(dim=-1)) <= cos + 1e-12).all()
    _, zero_factor = encode_keys(torch.zeros(1, 2, 64), rot, bits=bits)
    assert zero_factor.eq(0).all()  # a zero key estimates 0


@pytest.mark.parametrize("bits", [1, 3])
def test_integer_form_equals_float_form_for_any_bits(bits, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    keys = torch.randn(64, 1, 128, generator=gen)
    rot = random_rotation(128, fresh_seed, 1)
    codes, factor = encode_keys(keys, rot, bits=bits)
    q_u, delta, qmin = quantize_query(torch.randn(1, 1, 128, generator=gen), rot)
    q_bar = delta[0, 0].double() * q_u[0, 0].double() + qmin[0, 0].double()
    a = estimate_int(codes[:, 0], factor[:, 0], q_u[0, 0], delta[0, 0], qmin[0, 0])
    b = estimate_float(codes[:, 0], factor[:, 0], q_bar)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dim", [64, 128])
def test_each_key_bit_halves_the_estimate_error(dim):
    """Multi-bit codes stay unbiased, and each bit per dimension about halves the error's std."""
    trials, prev = 800, None
    for bits in (1, 2, 3, 4):
        err = estimator_errors(dim, 0.3, "none", trials, seed=dim + bits, key_bits=bits)
        std = float(err.std())
        assert abs(float(err.mean())) < 4 * std / math.sqrt(trials)
        if prev is not None:
            assert 0.4 < std / prev < 0.6, (bits, std, prev)
        prev = std
    assert prev < 0.2 * rabitq_error_bound(dim, 0.3)  # 4 bits: under a fifth of the 1-bit bound


@pytest.mark.parametrize("bits", [0, 5])
def test_codes_reject_bad_bits(bits):
    with pytest.raises(ValueError):
        encode_keys(torch.randn(2, 1, 32), torch.eye(32).view(1, 32, 32), bits=bits)
