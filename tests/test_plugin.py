"""The SGLang plugin on the real ServerArgs / parser (in fresh processes: plugins patch SGLang
globally, and the validated config travels through the environment)."""

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from sglang_rabitq.code_pool import code_bytes_per_token

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "head_dim": 32,
}


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("rabitq") == "sglang_rabitq.patches:load"


def test_flags_reach_server_args_and_are_validated(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    r = run_py(f"""
        import json, os
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import prepare_server_args
        base = ['--model-path', {str(tmp_path)!r}, '--attention-backend', 'rabitq', '--skip-tokenizer-init', '--device', 'cpu']
        a = prepare_server_args(base + ['--rabitq-top-p', '0.8', '--rabitq-window', '32', '--rabitq-max-budget', '0.2',
                                        '--rabitq-min-batch-context', '0', '--rabitq-key-bits', '3'])
        print('CONFIG', os.environ['SGLANG_RABITQ_CONFIG'])
        print('PREFILL_GRAPH_OFF', a.disable_prefill_cuda_graph)
        try:
            prepare_server_args(base + ['--rabitq-sink', '-3'])
        except ValueError as e:
            print('REJECTED', e)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads(r.stdout.split("CONFIG ", 1)[1].splitlines()[0])
    assert config["config"]["top_p"] == 0.8 and config["config"]["window"] == 32
    assert config["config"]["max_budget"] == 0.2 and config["config"]["min_batch_context"] == 0
    assert config["config"]["key_bits"] == 3
    assert config["prefill"] == "flashinfer"
    assert "PREFILL_GRAPH_OFF True" in r.stdout
    assert "REJECTED sink must be a non-negative integer" in r.stdout


def test_help_lists_backend_and_flags():
    r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rabitq}" in r.stdout  # a choice of --attention-backend
    for flag in ("--rabitq-top-p", "--rabitq-score-temperature", "--rabitq-sink", "--rabitq-window", "--rabitq-dense-layers",
                 "--rabitq-encode-chunk", "--rabitq-center", "--rabitq-calibrate-tokens", "--rabitq-rounding", "--rabitq-top-p-scope",
                 "--rabitq-max-budget", "--rabitq-prefill-backend", "--rabitq-min-batch-context", "--rabitq-key-bits"):
        assert flag in r.stdout


def test_other_sglang_versions_are_refused(monkeypatch):
    import sglang

    from sglang_rabitq.patches import version

    monkeypatch.setattr(sglang, "__version__", "0.4.0")
    with pytest.raises(RuntimeError, match="supports sglang==0.5.17"):
        version.check_sglang_version()


def test_memory_hook_targets_exist_and_cost_is_counted():
    # the hooked SGLang method must exist in this release
    module = importlib.import_module("sglang.srt.model_executor.pool_configurator")
    assert callable(module.DefaultPoolConfigurator._compute_cell_size)
    # Qwen2.5-0.5B: 24 layers, 2 dense, 2 kv-heads, head_dim 64: (8 + 4) bytes per (layer, head) + 1
    assert code_bytes_per_token(22, 2, 64) == 22 * 2 * 12 + 1
    assert code_bytes_per_token(22, 2, 64, key_bits=3) == 22 * 2 * (24 + 4) + 1  # three bit-planes


@pytest.mark.parametrize("field,value", [("encode_chunk", 0), ("calibrate_tokens", 0), ("calibrate_tokens", 2.5),
                                         ("center", "mean"), ("top_p", 0.0), ("max_budget", 0.0), ("max_budget", 1.5),
                                         ("min_batch_context", -1), ("min_batch_context", 2.5), ("key_bits", 0),
                                         ("key_bits", 5), ("score_temperature", 0.0)])
def test_bad_settings_are_refused_naming_the_setting(field, value):
    from sglang_rabitq.config import RaBitQConfig

    with pytest.raises(ValueError, match=field if field in ("max_budget", "min_batch_context") else field.split("_")[0]):
        RaBitQConfig(**{field: value})


def test_unset_selection_flags_take_the_defaults_of_the_models_head_dim():
    from sglang_rabitq.config import RaBitQConfig

    unset = RaBitQConfig()
    assert (unset.key_bits, unset.top_p, unset.score_temperature) == (None, None, None)
    got = lambda cfg, d: (lambda c: (c.key_bits, c.top_p, c.score_temperature))(cfg.for_head_dim(d))  # noqa: E731
    assert got(unset, 64) == (3, 0.9, 1.0)  # head dim 64: 1-bit estimates changed answers (config.default_key_bits)
    assert got(unset, 128) == (1, 0.95, 0.6)
    # a flag given stays; the others follow the key bits in force
    assert got(RaBitQConfig(key_bits=1), 64) == (1, 0.95, 0.6)
    assert got(RaBitQConfig(key_bits=2), 128) == (2, 0.9, 1.0)
    assert got(RaBitQConfig(top_p=0.8), 64) == (3, 0.8, 1.0)
    assert got(RaBitQConfig(score_temperature=0.5), 128) == (1, 0.95, 0.5)
    assert RaBitQConfig(key_bits=2).for_head_dim(64).for_head_dim(128) == RaBitQConfig(key_bits=2).for_head_dim(64)
