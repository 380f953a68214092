"""Startup checks: refuse, with the reason and the alternative, what the backend cannot serve."""

from __future__ import annotations

from sglang_rabitq.validation import check_head_dim

ALTERNATIVE = "serve this model with --attention-backend flashinfer (or triton) instead"


class UnsupportedModelError(ValueError):
    pass


MAX_GROUP = 8  # query heads per kv-head: the score kernel reads one byte per head of an int64 entry


def check_runner(model_runner, tp_size: int = 1) -> None:
    """Raise ``UnsupportedModelError`` naming every unsupported feature of this deployment
    (``tp_size``: the attention tensor-parallel degree, which sets the heads per GPU)."""
    cfg = model_runner.model_config
    problems = []
    if getattr(model_runner, "use_mla_backend", False) or str(getattr(cfg, "attention_arch", "")).endswith("MLA"):
        problems.append("multi-head latent attention (MLA) models are not supported")
    if getattr(model_runner, "sliding_window_size", None):
        problems.append("sliding-window attention models are not supported")
    if getattr(cfg, "is_hybrid_swa", False) or getattr(cfg, "is_hybrid", False):
        problems.append("hybrid-attention models are not supported")
    hf = getattr(cfg, "hf_text_config", None)
    if hf is not None and any(getattr(hf, a, None) for a in ("layer_types_linear", "linear_attn_config", "mamba_d_state")):
        problems.append("hybrid linear-attention / state-space models are not supported")
    if getattr(cfg, "head_dim", 0) != getattr(cfg, "v_head_dim", getattr(cfg, "head_dim", 0)):
        problems.append("models whose K and V head sizes differ are not supported")
    try:
        check_head_dim(int(cfg.head_dim))
    except ValueError as e:
        problems.append(str(e))
    group = cfg.get_num_attention_heads(tp_size) // max(cfg.get_num_kv_heads(tp_size), 1)
    if group > MAX_GROUP:
        problems.append(f"{group} query heads per kv-head are not supported (at most {MAX_GROUP})")
    spec = getattr(model_runner.server_args, "speculative_algorithm", None)
    if spec:
        problems.append(f"speculative decoding ({spec}) is not supported: drop --speculative-algorithm")
    page = getattr(model_runner, "page_size", 1) or 1
    if page != 1:
        problems.append(f"page size {page} is not supported: use --page-size 1")
    if problems:
        raise UnsupportedModelError("--attention-backend rabitq: " + "; ".join(problems) + f". To serve it, {ALTERNATIVE}.")
