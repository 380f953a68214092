import pytest
import torch

from sglang_rabitq.reference import (
    dense_decode_attention,
    encode_keys,
    rabitq_decode,
    random_rotation,
    sparse_decode_attention,
)
from sglang_rabitq.reference.decode import dense_region_lse


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (14, 2)])
def test_sparse_over_all_tokens_equals_dense(hq, hkv, fresh_seed):
    n, d = 77, 64
    k, v = torch.randn(n + 5, hkv, d), torch.randn(n + 5, hkv, d)
    q = torch.randn(hq, d)
    slots = torch.randperm(n + 5)[:n]
    dense = dense_decode_attention(q, k[slots], v[slots], 0.125)
    sparse = sparse_decode_attention(q, k, v, [slots] * hkv, 0.125)
    assert torch.allclose(dense, sparse, atol=1e-5)


def _batch(b, lens, hq, hkv, d, seed):
    torch.manual_seed(seed)
    pool = sum(lens) + 8
    k = torch.randn(pool, hkv, d)
    v = torch.randn(pool, hkv, d)
    req_to_token = torch.zeros(b + 2, max(lens) + 4, dtype=torch.int32)
    perm = torch.randperm(pool - 1) + 1
    off = 0
    for i, n in enumerate(lens):
        req_to_token[i + 1, :n] = perm[off : off + n].to(torch.int32)
        off += n
    rot = random_rotation(d, seed=seed, num_heads=hkv)
    codes, factor = encode_keys(k, rot)
    q = torch.randn(b, hq, d)
    return q, k, v, codes, factor, rot, req_to_token, torch.arange(1, b + 1), torch.tensor(lens)


def test_rabitq_decode_with_p1_equals_dense():
    lens = [300, 40, 130]
    q, k, v, codes, factor, rot, r2t, rpi, seq = _batch(3, lens, 8, 2, 64, 0)
    out, attended = rabitq_decode(
        q, k, v, codes, factor, rot, r2t, rpi, seq, seq, top_p=1.0, sink=16, window=16, sm_scale=0.125
    )
    for b, n in enumerate(lens):
        slots = r2t[b + 1, :n].long()
        assert torch.allclose(out[b], dense_decode_attention(q[b], k[slots], v[slots], 0.125), atol=1e-5)
        for h in range(2):
            assert torch.equal(attended[b][h], slots.sort().values)


def test_rabitq_decode_keeps_sink_window_and_unencoded_tail():
    lens = [400]
    q, k, v, codes, factor, rot, r2t, rpi, seq = _batch(1, lens, 4, 2, 64, 1)
    encoded = torch.tensor([300])  # the last 100 tokens have no codes yet
    _, attended = rabitq_decode(
        q, k, v, codes, factor, rot, r2t, rpi, seq, encoded, top_p=0.5, sink=8, window=16, sm_scale=0.125
    )
    row = r2t[1, :400].long()
    must = set(row[:8].tolist()) | set(row[300:].tolist())
    for h in range(2):
        got = set(attended[0][h].tolist())
        assert must <= got and len(got) < 400


def test_rabitq_decode_finds_planted_needle():
    # one key aligned with the query dominates: top-p must pick it from the scored region
    lens = [2000]
    q, k, v, codes, factor, rot, r2t, rpi, seq = _batch(1, lens, 1, 1, 128, 2)
    needle = int(r2t[1, 1000])
    k[needle, 0] = q[0, 0] * 3.0  # logit ~ 3 |q|^2 / sqrt(128) ~ 34: far above the rest (std ~1)
    codes, factor = encode_keys(k, rot)
    _, attended = rabitq_decode(
        q, k, v, codes, factor, rot, r2t, rpi, seq, seq, top_p=0.9, sink=4, window=4,
        sm_scale=128**-0.5, selector="exact",
    )
    assert needle in attended[0][0].tolist()
    assert len(attended[0][0]) < 1000


def test_context_scope_counts_the_sink_mass():
    # a sink key holding most of every head's mass: top-p over the context needs little of the
    # scored region, top-p over the scored region alone is blind to it
    lens = [1500]
    q, k, v, codes, factor, rot, r2t, rpi, seq = _batch(1, lens, 4, 2, 64, 3)
    sink_slot = int(r2t[1, 0])
    for h in range(2):
        k[sink_slot, h] = q[0, 2 * h : 2 * h + 2].sum(0) * 2.0
    codes, factor = encode_keys(k, rot)
    kw = dict(top_p=0.9, sink=4, window=4, sm_scale=0.125)
    _, scoped = rabitq_decode(q, k, v, codes, factor, rot, r2t, rpi, seq, seq, top_p_scope="context", **kw)
    _, plain = rabitq_decode(q, k, v, codes, factor, rot, r2t, rpi, seq, seq, top_p_scope="scored", **kw)
    for h in range(2):
        assert sink_slot in scoped[0][h].tolist()
        assert len(scoped[0][h]) < len(plain[0][h]) / 2, (len(scoped[0][h]), len(plain[0][h]))
    with pytest.raises(ValueError, match="top_p_scope"):
        rabitq_decode(q, k, v, codes, factor, rot, r2t, rpi, seq, seq, top_p_scope="all", **kw)


def test_dense_region_lse_is_centred_and_scaled():
    gen = torch.Generator().manual_seed(5)
    q, keys, c = torch.randn(3, 64, generator=gen), torch.randn(50, 64, generator=gen), torch.randn(64, generator=gen)
    got = dense_region_lse(q, keys, c, 0.3)
    assert torch.allclose(got, torch.logsumexp((q @ (keys - c).T) * 0.3, -1).double(), atol=1e-5)
    assert torch.allclose(dense_region_lse(q, keys, None, 0.3), torch.logsumexp((q @ keys.T) * 0.3, -1).double(), atol=1e-5)
