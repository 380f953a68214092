"""The backend inside a small serving loop of SGLang's real pools, radix cache and ForwardBatch
(dense prefill through SGLang's torch-native backend; our kernels under the Triton interpreter)."""

import dataclasses
import itertools
import math

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_harness import Harness
from sglang_rabitq.backend import RaBitQAttnBackend
from sglang_rabitq.config import RaBitQConfig
from sglang_rabitq.model_check import UnsupportedModelError
from sglang_rabitq.reference import SMALL_BIN, dense_decode_attention, encode_keys, rabitq_decode, unpack_bits

CFG = RaBitQConfig(top_p=0.9, sink=8, window=16, dense_layers=1, encode_chunk=8)


def make(harness, cfg=CFG):
    return RaBitQAttnBackend(harness.runner, cfg, TorchNativeAttnBackend(harness.runner))


def assert_codes_match(backend, harness, slots):
    """Codes of ``slots`` equal the reference encoding of the keys now in the KV pool (at the
    configured bits per dimension; a key whose code differs, at a rounding edge, keeps its own factor)."""
    slots = torch.as_tensor(slots, dtype=torch.int64)
    for lid in backend.pool.sparse_layers:
        keys = harness.kv_pool.get_key_buffer(lid)[slots].float()
        ref_codes, ref_factor = encode_keys(keys, backend.pool.rot[lid], backend.pool.center[lid],
                                            bits=backend.config.key_bits)
        got = backend.pool.codes[lid][slots]
        assert got.shape == ref_codes.shape
        diff = (unpack_bits(got) != unpack_bits(ref_codes)).float().mean()
        assert diff < 1e-3, f"layer {lid}: {diff:.4f} of bits differ"
        same = (got == ref_codes).all(-1)
        assert same.float().mean() > 0.98
        assert torch.allclose(backend.pool.factor[lid][slots][same], ref_factor[same], rtol=1e-4)


_REQUESTS = itertools.count()


def prefill(h, backend, tokens):
    """A new request's whole prompt in one extend batch (named, as the scheduler names requests)."""
    row, n_pre, new = h.new_request(tokens)
    h.run(backend, h.extend_batch([row], [n_pre], [len(tokens)], new, rids=[f"req-{next(_REQUESTS)}"]),
          len(tokens) - n_pre)
    return row, n_pre


def decode(h, backend, row, length):
    slot = h.append_token(row, length)
    return h.run(backend, h.decode_batch([row], [length + 1], slot), 1)


def test_prefill_encodes_every_new_key_and_dense_layers_keep_no_codes():
    h = Harness()
    b = make(h)
    row, _ = prefill(h, b, list(range(200)))
    slots = h.req_pool.req_to_token[row, :200].long()
    assert_codes_match(b, h, slots)
    assert b.pool.valid[slots].all() and int(b.pool.encoded_len[row]) == 200
    assert b.pool.sparse_layers == [1, 2] and 0 not in b.pool.codes
    snap = b.stats.snapshot()
    assert snap["codes_encoded"] == 200 and snap["codes_reused"] == 0


@pytest.mark.parametrize("scope,key_bits", [("scored", 1), ("context", 1), ("scored", 3)])
def test_decode_matches_reference_and_encodes_lazily_in_chunks(scope, key_bits):
    h = Harness()
    cfg = dataclasses.replace(CFG, top_p_scope=scope, key_bits=key_bits)
    b = make(h, cfg)
    row, _ = prefill(h, b, list(range(300)))
    length = 300
    for step in range(40):
        enc_before = int(b.pool.encoded_len[row])
        outs = decode(h, b, row, length)
        length += 1
        enc_after = int(b.pool.encoded_len[row])
        # lazy refresh: whole chunks, only once they are older than the window
        assert enc_after - enc_before in (0, CFG.encode_chunk)
        assert 0 <= length - enc_after < CFG.window + CFG.encode_chunk  # the unencoded tail stays bounded
        if step in (0, 39):  # compare a sparse layer's output with the reference on the live pool
            lid = 2
            q, out = outs[lid]
            ref, attended = rabitq_decode(
                q.view(1, 4, 64).float(), h.kv_pool.get_key_buffer(lid), h.kv_pool.get_value_buffer(lid),
                b.pool.codes[lid], b.pool.factor[lid], b.pool.rot[lid], h.req_pool.req_to_token,
                torch.tensor([row]), torch.tensor([length]), torch.tensor([enc_before]),
                top_p=CFG.top_p, sink=CFG.sink, window=CFG.window, sm_scale=64**-0.5,
                score_temperature=b.config.score_temperature, top_p_scope=scope, center=b.pool.center[lid],
            )
            assert torch.allclose(out.view(1, 4, 64).float(), ref, atol=3e-2, rtol=2e-2)
            assert max(len(a) for a in attended[0]) < length  # sparse
    encoded = h.req_pool.req_to_token[row, : int(b.pool.encoded_len[row])].long()
    assert_codes_match(b, h, encoded)
    tail = h.req_pool.req_to_token[row, int(b.pool.encoded_len[row]) : length].long()
    assert not b.pool.valid[tail].any()  # the unencoded tail is marked so


def test_radix_prefix_hit_reuses_codes_and_encodes_only_the_stale_tail():
    h = Harness()
    b = make(h)
    tokens_a = list(range(1000, 1300))
    row, _ = prefill(h, b, tokens_a)
    length = 300
    for _ in range(20):  # 20 decoded tokens; some stay unencoded in the window
        decode(h, b, row, length)
        tokens_a.append(5000 + length)
        length += 1
    enc_a = int(b.pool.encoded_len[row])
    assert enc_a < len(tokens_a)
    h.finish(row, tokens_a)
    before = b.stats.snapshot()
    # turn 2: the whole conversation so far plus a new user message
    tokens_b = tokens_a + list(range(9000, 9040))
    row_b, n_pre = prefill(h, b, tokens_b)
    assert n_pre == len(tokens_a)  # the radix tree served the whole first turn
    after = b.stats.snapshot()
    assert after["codes_reused"] - before["codes_reused"] == enc_a
    assert after["codes_encoded"] - before["codes_encoded"] == (len(tokens_a) - enc_a) + 40
    slots_b = h.req_pool.req_to_token[row_b, : len(tokens_b)].long()
    assert b.pool.valid[slots_b].all()
    assert_codes_match(b, h, slots_b)


def test_chunked_prefill_then_decode():
    h = Harness()
    b = make(h)
    tokens = list(range(400))
    row, n_pre, new = h.new_request(tokens)
    # two chunks, as --chunked-prefill-size would run them
    h.run(b, h.extend_batch([row], [0], [250], new[:250], rids=["r"]), 250)
    assert int(b.pool.encoded_len[row]) == 250
    h.run(b, h.extend_batch([row], [250], [400], new[250:], rids=["r"]), 150)
    # the second chunk's prefix is the request's own first chunk: encoded then, not reused now
    snap = b.stats.snapshot()
    assert int(b.pool.encoded_len[row]) == 400 and snap["codes_reused"] == 0 and snap["codes_encoded"] == 400
    assert_codes_match(b, h, h.req_pool.req_to_token[row, :400].long())
    decode(h, b, row, 400)


def test_a_chunked_prefill_counts_its_cache_hit_once():
    h = Harness()
    b = make(h)
    tokens_a = list(range(300))
    row_a, _ = prefill(h, b, tokens_a)
    h.finish(row_a, tokens_a)
    tokens_b = tokens_a + list(range(1000, 1300))
    row, n_pre, new = h.new_request(tokens_b)
    assert n_pre == 300
    before = b.stats.snapshot()
    h.run(b, h.extend_batch([row], [300], [400], new[:100], rids=["b"]), 100)
    h.run(b, h.extend_batch([row], [400], [600], new[100:], rids=["b"]), 200)
    after = b.stats.snapshot()
    assert after["codes_reused"] - before["codes_reused"] == 300  # the radix hit, in the first chunk only
    assert after["codes_encoded"] - before["codes_encoded"] == 300
    assert_codes_match(b, h, h.req_pool.req_to_token[row, :600].long())


def test_a_mixed_batch_extends_one_request_while_another_decodes():
    """--enable-mixed-chunk puts running requests' decode tokens into a prefill batch (MIXED mode):
    all of it attends densely through the extend path, the decoding request's unencoded window tail
    and its new token are encoded there, and its next decode step plans from that."""
    h = Harness()
    b = make(h)
    tokens_a = list(range(300))
    row_a, _, new = h.new_request(tokens_a)
    h.run(b, h.extend_batch([row_a], [0], [300], new, rids=["a"]), 300)
    length = 300
    for _ in range(3):
        decode(h, b, row_a, length)
        length += 1
    assert int(b.pool.encoded_len[row_a]) == 300  # three decoded tokens still in the window
    before = b.stats.snapshot()
    slot_a = h.append_token(row_a, length)
    row_b, _, new_b = h.new_request(list(range(5000, 5120)))
    fb = h.extend_batch([row_a, row_b], [length, 0], [length + 1, 120], torch.cat([slot_a, new_b]),
                        rids=["a", "b"], mode=ForwardMode.MIXED)
    outs = h.run(b, fb, 121)
    length += 1
    after = b.stats.snapshot()
    assert after["codes_reused"] - before["codes_reused"] == 0  # A's own codes: no cache hit
    assert after["codes_encoded"] - before["codes_encoded"] == 3 + 1 + 120  # its tail, its token, B
    for row, n in ((row_a, length), (row_b, 120)):
        slots = h.req_pool.req_to_token[row, :n].long()
        assert b.pool.valid[slots].all() and int(b.pool.encoded_len[row]) == n
        assert_codes_match(b, h, slots)
    lid = 2  # A's decode token attended every one of its keys, exactly
    q, out = outs[lid]
    slots = h.req_pool.req_to_token[row_a, :length].long()
    ref = dense_decode_attention(q[0].view(4, 64).float(), h.kv_pool.get_key_buffer(lid)[slots].float(),
                                 h.kv_pool.get_value_buffer(lid)[slots].float(), 64**-0.5)
    assert torch.allclose(out[0].view(4, 64).float(), ref, atol=2e-2, rtol=2e-2)
    outs = decode(h, b, row_a, length)  # the next plain decode step: sparse over the mixed batch's codes
    q, out = outs[lid]
    ref, attended = rabitq_decode(
        q.view(1, 4, 64).float(), h.kv_pool.get_key_buffer(lid), h.kv_pool.get_value_buffer(lid),
        b.pool.codes[lid], b.pool.factor[lid], b.pool.rot[lid], h.req_pool.req_to_token,
        torch.tensor([row_a]), torch.tensor([length + 1]), torch.tensor([length]),
        top_p=CFG.top_p, sink=CFG.sink, window=CFG.window, sm_scale=64**-0.5,
        score_temperature=b.config.score_temperature, center=b.pool.center[lid],
    )
    assert torch.allclose(out.view(1, 4, 64).float(), ref, atol=3e-2, rtol=2e-2)
    assert max(len(a) for a in attended[0]) < length + 1  # sparse


def test_decode_after_a_prefix_hit_is_bit_identical_to_decode_from_scratch():
    """The same conversation, once on an empty cache and once after another request left part of
    its prefix (and a lazily encoded tail) in the radix tree: every decode output is identical."""
    n_pre, n_prompt, steps = 200, 300, 30
    table = Harness()  # q/k/v per (layer, position) of the conversation
    qkv = [table.rand_qkv(n_prompt + steps) for _ in table.layers]

    def at(positions):
        return lambda lid: tuple(t[positions] for t in qkv[lid])

    def conversation(h, b):
        tokens = list(range(7000, 7000 + n_prompt))
        row, hit, _ = h.new_request(tokens)
        h.run(b, h.extend_batch([row], [hit], [n_prompt], h.req_pool.req_to_token[row, hit:n_prompt].long()),
              n_prompt - hit, qkv=at(slice(hit, n_prompt)))
        outs = []
        for i in range(steps):
            slot = h.append_token(row, n_prompt + i)
            outs.append(h.run(b, h.decode_batch([row], [n_prompt + i + 1], slot), 1, qkv=at(slice(n_prompt + i, n_prompt + i + 1))))
        return hit, outs

    h1 = Harness()
    b1 = make(h1)
    _, fresh = conversation(h1, b1)

    h2 = Harness(seed=1)
    b2 = make(h2)
    other = list(range(7000, 7000 + n_pre)) + list(range(100, 150))  # shares the first 200 tokens
    row, _, _ = h2.new_request(other)
    first = lambda lid: tuple(torch.cat([t[:n_pre], t2]) for t, t2 in zip(qkv[lid], h2.rand_qkv(50)))  # noqa: E731
    h2.run(b2, h2.extend_batch([row], [0], [len(other)], h2.req_pool.req_to_token[row, : len(other)].long()),
           len(other), qkv=first)
    for i in range(20):  # its own decode tail, partly unencoded when it finishes
        slot = h2.append_token(row, len(other) + i)
        h2.run(b2, h2.decode_batch([row], [len(other) + i + 1], slot), 1)
        other.append(9000 + i)
    h2.finish(row, other)
    hit, reused = conversation(h2, b2)
    assert hit == n_pre  # the radix tree served the shared prefix
    for step, (a, b) in enumerate(zip(fresh, reused)):
        for lid, ((_, out_a), (_, out_b)) in enumerate(zip(a, b)):
            assert torch.equal(out_a, out_b), (step, lid)


def test_freed_and_reused_slot_is_never_read_with_a_stale_code():
    h = Harness(slots=700)
    b = make(h)
    tokens = list(range(600))
    row, _ = prefill(h, b, tokens)
    h.finish(row, tokens)
    h.radix.evict(EvictParams(num_tokens=600))  # every slot back to the allocator, codes still "valid"
    assert b.pool.valid[1:601].all()
    row2, n_pre = prefill(h, b, list(range(7000, 7100)))  # reuses freed slots: re-encoded at extend
    assert n_pre == 0
    assert_codes_match(b, h, h.req_pool.req_to_token[row2, :100].long())
    length = 100
    for _ in range(3):
        decode(h, b, row2, length)
        slot = int(h.req_pool.req_to_token[row2, length])
        length += 1
        # the decoded token took a freed slot whose old code must not count as valid
        assert not bool(b.pool.valid[slot])
        assert int(b.pool.encoded_len[row2]) <= length - 1


def test_top_p_one_decodes_like_dense_attention():
    h = Harness()
    b = make(h, RaBitQConfig(top_p=1.0, sink=8, window=8, dense_layers=1, encode_chunk=8))
    d = TorchNativeAttnBackend(h.runner)
    row, _ = prefill(h, b, list(range(150)))
    slot = h.append_token(row, 150)
    fb = h.decode_batch([row], [151], slot)
    b.init_forward_metadata(fb)
    d.init_forward_metadata(fb)
    q, k, v = h.rand_qkv(1)
    layer = h.layers[2]
    ours = b.forward(q, k, v, layer, fb)
    dense = d.forward(q, k, v, layer, fb, save_kv_cache=False)
    assert torch.allclose(ours.float(), dense.float(), atol=2e-2, rtol=2e-2)


def test_max_budget_caps_the_set_even_at_top_p_one():
    h = Harness()
    cfg = dataclasses.replace(CFG, top_p=1.0, max_budget=0.1)
    b = make(h, cfg)
    row, _ = prefill(h, b, list(range(400)))
    enc = int(b.pool.encoded_len[row])
    q, out = decode(h, b, row, 400)[2]
    ref, attended = rabitq_decode(
        q.view(1, 4, 64).float(), h.kv_pool.get_key_buffer(2), h.kv_pool.get_value_buffer(2),
        b.pool.codes[2], b.pool.factor[2], b.pool.rot[2], h.req_pool.req_to_token,
        torch.tensor([row]), torch.tensor([401]), torch.tensor([enc]),
        top_p=1.0, sink=cfg.sink, window=cfg.window, sm_scale=64**-0.5,
        score_temperature=b.config.score_temperature, center=b.pool.center[2], max_budget=0.1,
    )
    assert torch.allclose(out.view(1, 4, 64).float(), ref, atol=3e-2, rtol=2e-2)
    # a kv-head attends about the cap of its scored tokens (a cut bin of <= SMALL_BIN tokens is kept
    # whole), plus the sink and window
    scored = 401 - cfg.sink - cfg.window
    for kept in attended[0]:
        assert len(kept) - (401 - scored) <= math.ceil(0.1 * scored) + SMALL_BIN


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(use_mla_backend=True), "MLA"),
        (dict(sliding_window_size=4096), "sliding-window"),
        (dict(page_size=16), "page size"),
        (dict(server_args=type("A", (), {"speculative_algorithm": "EAGLE"})()), "speculative"),
    ],
)
def test_unsupported_deployments_fail_at_startup_naming_the_reason(change, reason):
    h = Harness()
    for key, value in change.items():
        setattr(h.runner, key, value)
    with pytest.raises(UnsupportedModelError, match=reason):
        make(h)


def test_each_tensor_parallel_rank_draws_the_rotations_one_gpu_draws_for_its_kv_heads():
    """--tp 2 splits the kv-heads across ranks: each rank's code pool holds its own heads, rotated as
    a single GPU rotates those global heads, so a model's codes do not depend on the TP degree."""
    one = make(Harness(kv_heads=2, q_heads=4))
    for rank in (0, 1):
        h = Harness(kv_heads=1, q_heads=2)  # the KV pool and layers of one rank
        h.shape.kv_heads, h.shape.q_heads = 2, 4  # the model's totals: get_num_kv_heads(tp) halves them
        h.runner.tp_rank, h.runner.tp_size = rank, 2
        b = make(h)
        assert (b.num_kv_heads, b.num_q_heads) == (1, 2)
        assert b.pool.sparse_layers == one.pool.sparse_layers
        for lid in b.pool.sparse_layers:
            assert torch.equal(b.pool.rot[lid][0], one.pool.rot[lid][rank])


def test_groups_of_more_than_8_query_heads_fail_at_startup():
    h = Harness(kv_heads=1, q_heads=16)
    with pytest.raises(UnsupportedModelError, match="16 query heads per kv-head"):
        make(h)
    assert make(Harness(kv_heads=1, q_heads=8)).num_q_heads == 8


def test_head_dim_must_be_multiple_of_32():
    h = Harness()
    h.shape.head_dim = 80
    with pytest.raises(UnsupportedModelError, match="multiple of 32"):
        make(h)


def test_calibrated_centre_is_the_mean_of_the_first_prefill_keys_and_recodes_older_codes(caplog):
    caplog.set_level("INFO", logger="sglang_rabitq")
    h = Harness()
    cfg = RaBitQConfig(top_p=0.9, sink=8, window=16, dense_layers=1, encode_chunk=8, center="calibrate",
                       calibrate_tokens=300)
    b = make(h, cfg)
    row_a, _ = prefill(h, b, list(range(200)))  # a short first prompt: not enough to fix the centre
    assert not b.pool.calibrated and not b.pool.center.any()
    slots_a = h.req_pool.req_to_token[row_a, :200].long()
    assert_codes_match(b, h, slots_a)  # encoded around zero meanwhile
    decode(h, b, row_a, 200)
    row_b, _ = prefill(h, b, list(range(5000, 5150)))  # 350 prefill keys seen: the centre is fixed
    assert b.pool.calibrated
    assert "key centre fixed over the first 350 prefill tokens" in caplog.text  # the log says when, once
    slots_b = h.req_pool.req_to_token[row_b, :150].long()
    seen = torch.cat([slots_a, h.req_pool.req_to_token[row_a, 200:201].long(), slots_b])
    for lid in b.pool.sparse_layers:
        keys = h.kv_pool.get_key_buffer(lid)[torch.cat([slots_a, slots_b])].double()
        assert torch.allclose(b.pool.center[lid].double(), keys.mean(0), atol=1e-5)
    # every valid code, also those encoded before the centre was fixed, is around the new centre
    valid = seen[b.pool.valid[seen]]
    assert valid.numel() >= 350
    assert_codes_match(b, h, valid)
    centre = b.pool.center.clone()
    prefill(h, b, list(range(7000, 7400)))  # fixed for the server's lifetime
    assert torch.equal(b.pool.center, centre)


def test_a_finished_request_reports_its_own_decode_budget():
    h = Harness()
    b = make(h)
    tokens = list(range(300))
    row, n_pre, new = h.new_request(tokens)
    fb = h.extend_batch([row], [n_pre], [300], new)
    fb.rids = ["req-a"]
    h.run(b, fb, 300)
    context = 0
    for length in range(300, 312):
        decode(h, b, row, length)
        context += (length + 1) * 2  # two kv-heads
    h.finish(row, tokens + list(range(7000, 7012)))
    h.free_rows.insert(0, h.free_rows.pop())  # the next request gets the same row
    row_b, n_pre, new = h.new_request(list(range(9000, 9100)))
    assert row_b == row and not b.request_budgets.finished
    fb = h.extend_batch([row_b], [n_pre], [100], new)
    fb.rids = ["req-b"]
    h.run(b, fb, 100)
    b.request_budgets.collect()  # reported when the backend logs (it may have already, on its timer)
    (report,) = b.request_budgets.finished
    assert report["rid"] == "req-a" and report["decode_steps"] == 12
    attended = report["budget"] * context
    assert 0 < report["budget"] < 1 and abs(attended - round(attended)) < 1e-6
    snap = b.stats.snapshot()  # the global counters saw exactly these steps
    assert snap["context_tokens"] == context and snap["attended_tokens"] == round(attended)
    assert not b.request_budgets.counts[row].any()  # the row starts afresh for req-b


def test_a_batch_below_min_batch_context_attends_densely_and_keeps_the_codes_current():
    """Short batches take the dense path in every layer (exact attention), the lazy encode goes on, and
    once the batch's total context reaches the threshold the same requests decode sparsely."""
    h = Harness()
    cfg = dataclasses.replace(CFG, min_batch_context=400)
    b = make(h, cfg)
    d = TorchNativeAttnBackend(h.runner)
    assert b.switches and b.min_batch_context == 400
    row, _ = prefill(h, b, list(range(300)))
    length = 300
    for _ in range(30):  # a batch of 301..330 tokens: dense
        slot = h.append_token(row, length)
        fb = h.decode_batch([row], [length + 1], slot)
        b.init_forward_metadata(fb)
        d.init_forward_metadata(fb)
        assert b.dense_step(fb)
        q, k, v = h.rand_qkv(1)
        for layer in h.layers:
            ours = b.forward(q, k, v, layer, fb)
            dense = d.forward(q, k, v, layer, fb, save_kv_cache=False)
            assert torch.allclose(ours.float(), dense.float(), atol=2e-2, rtol=2e-2)
        length += 1
    # the lazy refresh kept pace: whole chunks older than the window are encoded, and correctly
    enc = int(b.pool.encoded_len[row])
    assert length - enc < cfg.window + cfg.encode_chunk
    assert_codes_match(b, h, h.req_pool.req_to_token[row, :enc].long())
    snap = b.stats.snapshot()
    assert snap["dense_steps"] == 30 and snap["attended_tokens"] == snap["context_tokens"]
    # a second request lifts the batch's context past the threshold: both decode sparsely
    row2, _ = prefill(h, b, list(range(5000, 5100)))
    slots = torch.cat([h.append_token(row, length), h.append_token(row2, 100)])
    fb = h.decode_batch([row, row2], [length + 1, 101], slots)
    assert not b.dense_step(fb)
    h.run(b, fb, 2)
    snap = b.stats.snapshot()
    assert snap["dense_steps"] == 30 and snap["decode_steps"] == 31
    assert snap["attended_tokens"] < snap["context_tokens"]


def test_the_backend_resolves_unset_flags_for_the_models_head_dim():
    b = make(Harness(), RaBitQConfig(sink=8, window=16, dense_layers=1, encode_chunk=8))  # head dim 64
    assert (b.config.key_bits, b.config.top_p, b.config.score_temperature) == (3, 0.9, 1.0)
    assert b.pool.codes[1].shape[-1] == 3 * 64 // 32  # three bit-planes stored


def test_without_a_dense_decode_kernel_the_threshold_applies_only_when_asked():
    h = Harness()
    assert make(h).min_batch_context == 0  # torch_native decodes outside CUDA graphs: no automatic switch
    assert make(h, dataclasses.replace(CFG, top_p=1.0)).min_batch_context == 0  # nothing selects anyway
    auto = RaBitQConfig(min_batch_context=None)
    # the automatic threshold: one layer's K and V of the batch fill AUTO_DENSE_KV_BYTES
    from sglang_rabitq.config import AUTO_DENSE_KV_BYTES

    assert auto.batch_context_threshold(2, 128, 2) == AUTO_DENSE_KV_BYTES // 1024 == 524288
    assert auto.batch_context_threshold(8, 128, 2) == 131072


def test_capture_warm_ups_and_padding_rows_are_not_counted_as_decode():
    """SGLang's CUDA-graph capture runs the batch eagerly with every seq_len 1, and a replayed batch is
    padded with such rows: neither counts towards the decode steps, budget or context."""
    h = Harness()
    b = make(h)
    row, _ = prefill(h, b, list(range(300)))
    slot = h.append_token(row, 300)
    fb = h.decode_batch([row, 1], [301, 1], torch.cat([slot, torch.zeros(1, dtype=torch.int64)]))
    h.run(b, fb, 2)
    snap = b.stats.snapshot()
    assert snap["decode_steps"] == 1 and snap["context_tokens"] == 301 * 2
    warm_up = h.decode_batch([2, 3], [1, 1], torch.zeros(2, dtype=torch.int64))
    h.run(b, warm_up, 2)
    assert b.stats.snapshot() == snap
