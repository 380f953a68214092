"""The decode-graph hooks (patches/cuda_graph.py) on SGLang's real decode CUDA-graph runner: with a
switching backend each batch size is recorded twice, once per path, and a batch replays the variant
its total context asks for; without one the runner is untouched."""

import dataclasses
import inspect
import subprocess
import sys

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

from sglang_harness import Harness
from sglang_rabitq.backend import RaBitQAttnBackend
from sglang_rabitq.config import RaBitQConfig
from sglang_rabitq.patches import cuda_graph

CFG = RaBitQConfig(top_p=0.9, sink=8, window=16, dense_layers=1, encode_chunk=8, min_batch_context=500)


def runner_with(backend):
    """The real runner class with only the state the two hooked methods read (capture needs a GPU)."""
    runner = object.__new__(DecodeCudaGraphRunner)
    runner.attn_backend = backend
    return runner


def backend_for(cfg):
    h = Harness()
    return h, RaBitQAttnBackend(h.runner, cfg, TorchNativeAttnBackend(h.runner))


def test_hooked_methods_exist_with_the_arguments_the_hooks_take():
    capture = inspect.signature(DecodeCudaGraphRunner.capture_one_shape).parameters
    assert list(capture)[:5] == ["self", "size", "forward", "stream_idx", "variant_label"]
    assert list(inspect.signature(DecodeCudaGraphRunner._resolve_lora_variant).parameters) == ["self", "forward_batch"]


def test_each_batch_size_is_captured_once_per_path_and_replays_the_one_its_context_asks_for():
    h, backend = backend_for(CFG)
    runner = runner_with(backend)
    recorded = []

    def capture(self, size, forward, stream_idx=None, variant_label=None):
        # what SGLang's capture would record: the path forward_decode takes while the graph is captured
        recorded.append((size, variant_label, backend._attends_densely(backend.last_sparse_layer)))

    cuda_graph._around_capture_one_shape(capture, runner, 8, None, None, None)
    assert recorded == [(8, "rabitq-sparse", False), (8, "rabitq-dense", True)]
    assert not backend._dense_step  # capture leaves eager decode as it found it
    captured = {label: dense for _, label, dense in recorded}

    short = h.decode_batch([0, 1], [200, 299], torch.zeros(2, dtype=torch.int64))  # 499 tokens
    long = h.decode_batch([0, 1], [200, 300], torch.zeros(2, dtype=torch.int64))  # 500 tokens
    original = DecodeCudaGraphRunner._resolve_lora_variant  # SGLang's: None without LoRA variants
    assert captured[cuda_graph._around_resolve_variant(original, runner, short)] is True
    assert captured[cuda_graph._around_resolve_variant(original, runner, long)] is False


def test_the_choice_reads_host_lengths_only():
    h, backend = backend_for(CFG)
    fb = h.decode_batch([0, 1], [200, 300], torch.zeros(2, dtype=torch.int64))
    fb.seq_lens_sum = None  # the host-side tensor still says 500
    assert not backend.dense_step(fb)
    fb.seq_lens_cpu = None  # nothing on the host (an idle batch): the dense backend's path, no sync
    assert backend.dense_step(fb)


def test_a_lora_label_keeps_its_part():
    assert cuda_graph.path_label("lora", True) == "lora+rabitq-dense"
    assert cuda_graph.path_label(None, False) == "rabitq-sparse"


def test_runners_of_other_backends_or_an_always_sparse_one_are_untouched():
    _, always_sparse = backend_for(dataclasses.replace(CFG, min_batch_context=0))
    for backend in (always_sparse, object()):
        runner = runner_with(backend)
        calls = []
        cuda_graph._around_capture_one_shape(lambda *a: calls.append(a[1:]), runner, 4, "fwd", None, "lora")
        assert calls == [(4, "fwd", None, "lora")]
        assert cuda_graph._around_resolve_variant(lambda self, fb: "lora", runner, None) == "lora"


def test_the_plugin_installs_both_hooks_on_the_runner():
    code = (
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "HookRegistry.apply_hooks()\n"
        "from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner as R\n"
        "import inspect\n"
        "for name in ('capture_one_shape', '_resolve_lora_variant'):\n"
        "    hooks = inspect.getclosurevars(getattr(R, name)).nonlocals.get('hook')\n"
        "    print(name, getattr(hooks, '__module__', None) == 'sglang_rabitq.patches.cuda_graph')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "capture_one_shape True" in r.stdout and "_resolve_lora_variant True" in r.stdout, r.stdout
