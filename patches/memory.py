"""Count the code pool in SGLang's memory planning: each KV-pool slot also costs its codes, so the
KV pool shrinks by exactly what the index needs."""

from __future__ import annotations

import logging

logger = logging.getLogger("sglang_rabitq")


def _uses_rabitq(server_args) -> bool:
    return "rabitq" in {getattr(server_args, a, None) for a in ("attention_backend", "decode_attention_backend")}


def _after_compute_cell_size(cell_size, self, kvc, num_layers):
    if not _uses_rabitq(kvc.server_args):
        return cell_size
    from sglang.srt.runtime_context import get_parallel

    from sglang_rabitq.code_pool import code_bytes_per_token
    from sglang_rabitq.kernels.decode import workspace_bytes_per_slot
    from sglang_rabitq.patches.server_args import config_from_server_args

    config, _ = config_from_server_args(kvc.server_args)
    cfg = kvc.model_config
    kv_heads = cfg.get_num_kv_heads(get_parallel().attn_tp_size)
    sparse = max(0, int(num_layers) - config.dense_layers)
    extra = code_bytes_per_token(sparse, kv_heads, cfg.head_dim, config.for_head_dim(cfg.head_dim).key_bits)
    extra += workspace_bytes_per_slot(cfg.get_num_attention_heads(get_parallel().attn_tp_size), kv_heads)
    logger.info("rabitq: code pool and decode workspace add %d B per KV slot to %d B of K/V", extra, cell_size)
    return cell_size + extra


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _after_compute_cell_size, HookType.AFTER,
    )
