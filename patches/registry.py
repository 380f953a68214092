"""Register the ``rabitq`` name: in the CLI's --attention-backend choices and in the backend registry."""

from __future__ import annotations

import logging

logger = logging.getLogger("sglang_rabitq")
NAME = "rabitq"


def create_backend(model_runner):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_rabitq.backend import RaBitQAttnBackend
    from sglang_rabitq.patches.server_args import config_from_server_args

    config, prefill = config_from_server_args(model_runner.server_args)
    if prefill not in ATTENTION_BACKENDS or prefill == NAME:
        raise ValueError(f"--rabitq-prefill-backend {prefill!r} is not an SGLang attention backend")
    dense = ATTENTION_BACKENDS[prefill](model_runner)
    return RaBitQAttnBackend(model_runner, config, dense)


def register() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    ATTENTION_BACKENDS[NAME] = create_backend
