"""Two decode CUDA graphs per batch size when the backend switches between dense and sparse steps
(``--rabitq-min-batch-context``): which path a step takes is Python control flow, fixed when a graph
is recorded. SGLang's decode runner already keys its graphs by a variant label (``ShapeKey``, used
for LoRA); these hooks record a dense and a sparse variant of each batch size and replay the one
the batch's total context asks for.
"""

from __future__ import annotations

RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"


def _switching_backend(runner):
    from sglang_rabitq.backend import RaBitQAttnBackend

    backend = getattr(runner, "attn_backend", None)
    return backend if isinstance(backend, RaBitQAttnBackend) and backend.switches else None


def path_label(base: str | None, dense: bool) -> str:
    """The runner's own label (None, or a LoRA variant) with the decode path appended."""
    path = "rabitq-dense" if dense else "rabitq-sparse"
    return path if base is None else f"{base}+{path}"


def _around_resolve_variant(original, self, forward_batch):
    base = original(self, forward_batch)
    backend = _switching_backend(self)
    return base if backend is None else path_label(base, backend.dense_step(forward_batch))


def _around_capture_one_shape(original, self, size, forward, stream_idx=None, variant_label=None):
    backend = _switching_backend(self)
    if backend is None:
        return original(self, size, forward, stream_idx, variant_label)
    for dense in (False, True):
        with backend.capturing(dense):
            original(self, size, forward, stream_idx, path_label(variant_label, dense))


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{RUNNER}._resolve_lora_variant", _around_resolve_variant, HookType.AROUND)
    HookRegistry.register(f"{RUNNER}.capture_one_shape", _around_capture_one_shape, HookType.AROUND)
