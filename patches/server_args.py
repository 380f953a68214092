"""The ``--rabitq-*`` flags: added to SGLang's parser, validated when the server args are built,
and carried to every process (scheduler processes re-read them from the environment)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from sglang_rabitq.config import (
    AUTO_DENSE_KV_BYTES, CENTER_MODES, ROUNDING_MODES, TOP_P_SCOPES, RaBitQConfig, default_key_bits, default_selection)
from sglang_rabitq.reference.codes import KEY_BITS

logger = logging.getLogger("sglang_rabitq")
ENV = "SGLANG_RABITQ_CONFIG"
PREFILL_CHOICES = ("flashinfer", "triton", "torch_native")
_DEFAULTS = RaBitQConfig()


def add_rabitq_args(parser) -> None:
    g = parser.add_argument_group("RaBitQ sparse decode (--attention-backend rabitq)")
    g.add_argument("--rabitq-top-p", type=float, default=_DEFAULTS.top_p,
                   help="estimated attention mass each query head keeps, in (0, 1]; 1 attends every token "
                        "(default: %g with 1-bit key codes, %g with more)" % (default_selection(1)[0], default_selection(2)[0]))
    g.add_argument("--rabitq-score-temperature", type=float, default=_DEFAULTS.score_temperature,
                   help="estimated logits are multiplied by this before top-p; < 1 undoes the sharpening that "
                        "estimation noise causes (default: %g with 1-bit key codes, %g with more)"
                        % (default_selection(1)[1], default_selection(2)[1]))
    g.add_argument("--rabitq-top-p-scope", choices=TOP_P_SCOPES, default=_DEFAULTS.top_p_scope,
                   help="context: p of the whole context's attention mass (the sink and recent window, attended "
                        "exactly, count towards it); scored: p of the mass of the tokens outside them")
    g.add_argument("--rabitq-max-budget", type=float, default=_DEFAULTS.max_budget,
                   help="each kv-head attends at most about this fraction of its scored tokens (the union of its "
                        "query heads' top-p sets), in (0, 1]; bounds the decode work where the estimated attention "
                        "is flat (1: no cap)")
    g.add_argument("--rabitq-sink", type=int, default=_DEFAULTS.sink, help="first tokens always attended")
    g.add_argument("--rabitq-window", type=int, default=_DEFAULTS.window,
                   help="last tokens always attended (plus the not-yet-encoded tail)")
    g.add_argument("--rabitq-dense-layers", type=int, default=_DEFAULTS.dense_layers, help="first layers attend densely")
    g.add_argument("--rabitq-encode-chunk", type=int, default=_DEFAULTS.encode_chunk,
                   help="decoded tokens are encoded in batches of this many")
    g.add_argument("--rabitq-min-batch-context", type=int, default=_DEFAULTS.min_batch_context,
                   help="decode batches whose total context (tokens summed over the batch) is below this attend "
                        "densely, through the dense backend's kernel and CUDA graphs (0: always sparse; default: "
                        "the context whose K/V per layer is %d MiB on this GPU's share of the kv-heads)"
                        % (AUTO_DENSE_KV_BYTES >> 20))
    g.add_argument("--rabitq-center", choices=CENTER_MODES, default=_DEFAULTS.center,
                   help="key centring: none, or calibrate: per (layer, kv-head) mean of the first prefill keys, "
                        "then fixed for the server's lifetime")
    g.add_argument("--rabitq-calibrate-tokens", type=int, default=_DEFAULTS.calibrate_tokens,
                   help="with --rabitq-center calibrate: prefill keys the mean is taken over before it is fixed")
    g.add_argument("--rabitq-rounding", choices=ROUNDING_MODES, default=_DEFAULTS.rounding,
                   help="INT4 query rounding: nearest or random (unbiased)")
    g.add_argument("--rabitq-key-bits", type=int, choices=KEY_BITS, default=_DEFAULTS.key_bits,
                   help="bits per dimension of each key's code: more bits estimate the logits more closely (each "
                        "about halves the error) for D/8 more bytes per token and kv-head of index and score reads "
                        "(default: %d at head dim 64, %d at 128)" % (default_key_bits(64), default_key_bits(128)))
    g.add_argument("--rabitq-seed", type=int, default=_DEFAULTS.seed, help="seed of the random rotations")
    g.add_argument("--rabitq-prefill-backend", choices=PREFILL_CHOICES, default="flashinfer",
                   help="SGLang backend that runs the dense prefill / extend attention")


def _after_add_cli_args(result, parser):
    add_rabitq_args(parser)
    return result


def _around_from_cli_args(original, cls, args):
    uses_rabitq = "rabitq" in {getattr(args, a, None) for a in
                               ("attention_backend", "prefill_attention_backend", "decode_attention_backend")}
    if uses_rabitq and not getattr(args, "disable_prefill_cuda_graph", True):
        # extend batches encode a data-dependent set of slots, planned on the host: not capturable
        logger.info("rabitq: prefill CUDA graphs off (decode CUDA graphs stay on)")
        args.disable_prefill_cuda_graph = True
    server_args = original(cls, args)
    if uses_rabitq:
        fields = {f.name: getattr(args, f"rabitq_{f.name}") for f in dataclasses.fields(RaBitQConfig) if hasattr(args, f"rabitq_{f.name}")}
        config = RaBitQConfig(**fields)  # raises a ValueError naming the bad flag before startup
        payload = {"config": dataclasses.asdict(config), "prefill": args.rabitq_prefill_backend}
        os.environ[ENV] = json.dumps(payload)  # inherited by the scheduler processes
    return server_args


def config_from_server_args(server_args) -> tuple[RaBitQConfig, str]:
    """The validated config and the dense prefill backend name (defaults if no flag was given)."""
    raw = os.environ.get(ENV)
    if raw:
        payload = json.loads(raw)
        return RaBitQConfig(**payload["config"]), payload["prefill"]
    return RaBitQConfig.from_server_args(server_args), getattr(server_args, "rabitq_prefill_backend", None) or "flashinfer"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _around_from_cli_args, HookType.AROUND)
