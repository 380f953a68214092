"""eval/answer_fidelity.py: its batched decode masks are the reference decode step's sets, its lazy
encoding is the planner's, and its attention hook reproduces dense greedy decoding on a real
transformers model (random weights) when nothing is dropped."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import answer_fidelity as A  # noqa: E402
from sglang_rabitq.code_pool import layer_rotations  # noqa: E402
from sglang_rabitq.reference import decode_regions, encode_keys, rabitq_decode  # noqa: E402
from sglang_rabitq.reference.select import top_p_mask  # noqa: E402
from sglang_rabitq.reference.plan import plan_decode  # noqa: E402


def test_encoded_lengths_follow_the_planner():
    reg = A.Regions(sink=4, window=8, encode_chunk=4)
    prompt, steps = 50, 40
    req_to_token = torch.arange(prompt + steps)[None]
    encoded_len = torch.tensor([prompt])
    valid = torch.zeros(prompt + steps, dtype=torch.bool)
    seen = []
    for t in range(steps):
        seen.append(int(encoded_len[0]))
        plan_decode(torch.tensor([0]), torch.tensor([prompt + t + 1]), req_to_token, encoded_len, valid,
                    capacity=1 << 20, num_chunks=1, sink=reg.sink, window=reg.window, chunk=reg.encode_chunk,
                    align=1, mutate=True)
    assert A.encoded_lengths(prompt, steps, reg) == seen
    assert seen[-1] > prompt  # the lazy refresh ran


def test_decode_masks_are_the_reference_sets(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    hq, hkv, d, prompt, steps = 4, 2, 64, 300, 30
    n = prompt + steps
    keys = torch.randn(n, hkv, d, generator=gen) + 0.5
    q = torch.randn(steps, hq, d, generator=gen) * 2.0
    rot = layer_rotations(d, fresh_seed, 3, range(hkv))
    center = keys[:100].mean(0)
    reg = A.Regions(sink=16, window=16, encode_chunk=8)
    scale = d**-0.5
    codes, factor = encode_keys(keys, rot, center)
    for setting in [A.Setting(0.9, 0.6), A.Setting(0.8, 1.0, 0.2), A.Setting(1.0, 1.0, 0.1)]:
        mask, budget = A.decode_masks(q, keys, A.LayerCodes(rot, center), prompt, setting, reg, scale)
        enc = A.encoded_lengths(prompt, steps, reg)
        assert enc[-1] > prompt  # some steps read lazily encoded codes
        for t in range(steps):
            length = prompt + t + 1
            _, attended = rabitq_decode(
                q[t : t + 1], keys, keys, codes, factor, rot, torch.arange(n, dtype=torch.int32)[None],
                torch.tensor([0]), torch.tensor([length]), torch.tensor([enc[t]]), top_p=setting.top_p,
                sink=reg.sink, window=reg.window, sm_scale=scale, score_temperature=setting.temperature,
                center=center, max_budget=setting.max_budget)
            for h in range(hkv):
                got = torch.nonzero(mask[h, t]).flatten()
                assert torch.equal(got, attended[0][h].long()), (setting, t, h)
                assert budget[t, h] == len(got) / length
        assert budget.mean() < 1.0


def test_exact_settings_select_true_top_p_sets(fresh_seed):
    """The oracle settings keep, per kv-head, the union of its heads' exact top-p sets of the true
    logits over the scored region (no codes read); the sink and window stay attended."""
    gen = torch.Generator().manual_seed(fresh_seed)
    hq, hkv, d, prompt, steps = 4, 2, 64, 300, 12
    n = prompt + steps
    keys = torch.randn(n, hkv, d, generator=gen)
    q = torch.randn(steps, hq, d, generator=gen) * 2.0
    reg = A.Regions(sink=16, window=16, encode_chunk=8)
    scale = d**-0.5
    setting = A.parse_settings("0.9,1.0,exact")[0]
    assert setting == A.Setting(0.9, 1.0, exact=True) and setting.label == "p 0.9 t 1 exact logits"
    codes = A.LayerCodes(layer_rotations(d, fresh_seed, 3, range(hkv)), keys[:100].mean(0))
    mask, budget = A.decode_masks(q, keys, codes, prompt, setting, reg, scale)
    assert not codes.values  # nothing encoded
    enc = A.encoded_lengths(prompt, steps, reg)
    for t in range(steps):
        r = decode_regions(prompt + t + 1, enc[t], reg.sink, reg.window)
        for h in range(hkv):
            qg = q[t, h * (hq // hkv) : (h + 1) * (hq // hkv)].double()
            logits = qg @ keys[r.sink_end : r.score_end, h].double().T * scale
            want = top_p_mask(logits, 0.9).any(0)
            assert torch.equal(mask[h, t, r.sink_end : r.score_end], want)
            assert mask[h, t, : r.sink_end].all() and mask[h, t, r.score_end : prompt + t + 1].all()
            assert 0 < want.sum() < want.numel()
    assert budget.mean() < 1.0


def test_more_key_bits_select_closer_to_the_exact_sets(fresh_seed):
    """The multi-bit study settings: each kv-head's selection moves towards the oracle's (exact top-p of
    the true logits) as the key codes gain bits per dimension."""
    gen = torch.Generator().manual_seed(fresh_seed)
    hq, hkv, d, prompt, steps = 4, 2, 64, 300, 12
    keys = torch.randn(prompt + steps, hkv, d, generator=gen)
    q = torch.randn(steps, hq, d, generator=gen) * 2.0
    reg = A.Regions(sink=16, window=16, encode_chunk=8)
    codes = A.LayerCodes(layer_rotations(d, fresh_seed, 3, range(hkv)), keys[:100].mean(0))
    settings = A.parse_settings("0.9,1.0,exact;0.9,1.0;0.9,1.0,b2;0.9,1.0,b4")
    assert [s.key_bits for s in settings] == [1, 1, 2, 4] and settings[3].label == "p 0.9 t 1 4-bit keys"
    oracle, _ = A.decode_masks(q, keys, codes, prompt, settings[0], reg, d**-0.5)
    jaccard = []
    for s in settings[1:]:
        mask, _ = A.decode_masks(q, keys, codes, prompt, s, reg, d**-0.5)
        jaccard.append(float((mask & oracle).sum() / (mask | oracle).sum()))
    assert sorted(codes.values) == [1, 2, 4]  # each setting's own codes
    assert jaccard[0] < jaccard[1] < jaccard[2] and jaccard[2] > 0.85, jaccard


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits with some spread, so that top-p drops tokens
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


def test_attention_hook_reproduces_dense_greedy_decoding():
    from transformers import DynamicCache

    model = _tiny_model()
    reg = A.Regions(sink=8, window=8, encode_chunk=8)
    attn = A.attach(model, reg, dense_layers=1, seed=0)
    prompt = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = DynamicCache(config=model.config)
    first = A.prefill(model, cache, prompt, chunk=128)
    attn.calibrate(cache, 128)
    attn.prompt_len = len(prompt)
    answer = A.greedy(model, cache, first, 12, eos=set())
    assert len(answer) == 12
    cache.crop(len(prompt))
    dense = A.teacher_forced(model, cache, attn, answer, None)
    assert dense.argmax(-1).tolist() == answer[1:]  # the forced pass is the free-running one
    cache.crop(len(prompt))
    attn.budgets = []
    everything = A.teacher_forced(model, cache, attn, answer, A.Setting(1.0, 1.0))
    torch.testing.assert_close(everything, dense, rtol=1e-4, atol=1e-4)
    assert float(torch.stack(attn.budgets).mean()) == 1.0
    cache.crop(len(prompt))
    attn.budgets = []
    sparse = A.teacher_forced(model, cache, attn, answer, A.Setting(0.5, 1.0))
    assert float(torch.stack(attn.budgets).mean()) < 0.9
    assert not torch.allclose(sparse, dense, atol=1e-3)
    cmp = A.compare(dense, sparse, answer[1:])
    assert cmp["kl_mean"] > 0 and 0.0 <= cmp["token_agreement"] <= 1.0
    assert A.compare(dense, dense, answer[1:]) == {"exact": True, "first_diff": None, "token_agreement": 1.0,
                                                   "kl_mean": 0.0, "dense_margin_at_diff": None}


def test_served_comparison_counts_each_question_once():
    label = A.Setting(0.8, 1.0).label
    rows = [{"expected": e, "prompt_key": f"k{e}", "answer": f"dense {e}", "settings": {label: {"exact": here}}}
            for e, here in [("a", True), ("b", False), ("c", True), ("d", False)]]
    texts = [("dense a", "dense a"), ("dense b", "other"), ("x", "y"), ("dense d", "dense d")]
    # served in another order than studied: matched by prompt
    level = lambda i: [{"expected": e, "prompt_key": f"k{e}", "text": texts["abcd".index(e)][i]}  # noqa: E731
                       for e in "dbca"]
    served = {"config": {"top_p": 0.8, "rabitq_args": "--rabitq-score-temperature 1.0"},
              "runs": {"dense": {"levels": [{"results": level(0)}]}, "rabitq": {"levels": [{"results": level(1)}]}}}
    got = A.served_comparison({"questions": rows}, served, 128)
    assert got == {"setting": label, "questions": 4, "both_equal": 1, "only_served_differs": 1,
                   "only_here_differs": 1, "both_differ": 1, "served_exact": 0.5, "here_exact": 0.5,
                   "dense_answers_equal": 0.75}
    # the server's defaults for the head dim where a flag is absent
    assert A.served_setting({"top_p": 0.9, "rabitq_args": ""}, 128) == A.Setting(0.9, 0.6, 1.0)
    assert A.served_setting({"top_p": 0.9, "rabitq_args": ""}, 64) == A.Setting(0.9, 1.0, 1.0, key_bits=3)
    assert A.served_setting({"top_p": 0.8, "rabitq_args": "--rabitq-key-bits 2 --rabitq-max-budget 0.15"}, 128) \
        == A.Setting(0.8, 1.0, 0.15, key_bits=2)
    assert A.served_setting({"top_p": 0.9, "rabitq_args": "--rabitq-key-bits 1"}, 64) == A.Setting(0.9, 0.6, 1.0)
    served["runs"]["dense"]["levels"][0]["results"][0]["prompt_key"] = "unknown"
    try:
        A.served_comparison({"questions": rows}, served, 128)
    except ValueError as e:
        assert "other questions" in str(e)
    else:
        raise AssertionError("a served run of other questions must be refused")


def test_summary_averages_and_margins():
    s = A.Setting(0.9, 0.6, 0.2)
    rows = [{"settings": {s.label: {"exact": e, "token_agreement": a, "kl_mean": k, "budget": b,
                                    "dense_margin_at_diff": m}}}
            for e, a, k, b, m in [(True, 1.0, 0.0, 0.2, None), (False, 0.9, 0.1, 0.3, 0.5), (False, 0.8, 0.2, 0.1, 3.0)]]
    (got,) = A.summarize(rows, [s])
    assert got["exact"] == 1 / 3 and abs(got["budget"] - 0.2) < 1e-12 and got["questions"] == 3
    assert got["margin_at_diff_median"] == 1.75 and got["margin_at_diff_max"] == 3.0
    assert abs(got["token_agreement"] - 0.9) < 1e-12 and abs(got["kl_mean"] - 0.1) < 1e-12
