"""RaBitQ settings: one validated dataclass, filled from SGLang's server args (``--rabitq-*``)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from sglang_rabitq.reference.codes import check_key_bits
from sglang_rabitq.reference.decode import TOP_P_SCOPES
from sglang_rabitq.validation import check_choice, check_fraction, check_non_negative

CENTER_MODES = ("none", "calibrate")
# without --rabitq-min-batch-context, decode batches attend densely while one layer's K and V of the whole
# batch are below this many bytes: below it the sparse path's fixed cost per layer (scoring every token,
# five dependent launches) exceeds what it saves. Qwen2.5-Coder-1.5B on an H200, batch 16, top-p 0.9 with
# a 0.2 cap (speed-qwen15-h200-switch.json): sparse 0.88x of dense at 16K (256 MiB), 1.02x at 32K (512 MiB)
AUTO_DENSE_KV_BYTES = 512 << 20
ROUNDING_MODES = ("nearest", "random")


def default_key_bits(head_dim: int) -> int:
    """Key bits where ``--rabitq-key-bits`` is not given. At head dim 64 one bit per dimension changed
    dense's greedy answers at every setting measured on Qwen2.5-Coder-0.5B (at most 17 of 32 kept,
    answer_fidelity-qwen05-*.md); 3 bits at the multi-bit operating point kept 31 of 32 on the CPU and
    served them at the batching noise floor (e2e-h100-2026-12-07c-qwen05-key-bits3.md). At head dim 128
    one bit at t 0.6 served all 44 answers on Qwen2.5-Coder-1.5B at p 0.9 (prefix_sharing-qwen15.json),
    below the default p. Only 64 and 128 are measured: smaller head dims take 3 bits, larger ones 1."""
    return 3 if head_dim <= 64 else 1


def default_selection(key_bits: int) -> tuple[float, float]:
    """``(top_p, score_temperature)`` where the flags are not given, for codes of ``key_bits``. One-bit
    estimates are noisy enough to sharpen the estimated softmax, which a temperature of 0.6 offsets
    (fidelity.md); more bits estimate closely enough for the plain softmax and a lower p
    (answer_fidelity-qwen05-key-bits.md, answer_fidelity-qwen15-key-bits.md)."""
    return (0.95, 0.6) if key_bits == 1 else (0.9, 1.0)


@dataclass(frozen=True)
class RaBitQConfig:
    """``None`` fields take their value from the model's head dim (``for_head_dim``): ``key_bits`` from
    ``default_key_bits``, then ``top_p`` and ``score_temperature`` from ``default_selection``."""

    top_p: float | None = None  # estimated attention mass each query head keeps
    score_temperature: float | None = None  # estimated logits x this before top-p (noise sharpens them)
    # p of the scored region's estimated mass, or of the whole context's (the sink and window's exact
    # mass counts): on SmolLM2 the two keep equal true mass within 6 % of K/V budget (fidelity-scope.md)
    top_p_scope: str = "scored"
    # at most this fraction of a kv-head's scored tokens (its query heads' union): bounds the work of flat heads
    max_budget: float = 1.0
    sink: int = 64  # first tokens always attended
    window: int = 64  # last tokens always attended (plus the not-yet-encoded tail)
    dense_layers: int = 2  # first layers attend densely
    encode_chunk: int = 64  # decoded tokens are encoded in batches of this many
    # decode batches whose total context (tokens, summed over requests) is below this attend densely in
    # every layer, through the dense backend and its own CUDA graphs: where attention is cheap the sparse
    # path's fixed cost per layer exceeds what it saves. None: the backend picks (``min_batch_context``
    # in backend.py); 0: always sparse
    min_batch_context: int | None = None
    # key centring: per (layer, kv-head) mean of the first prefill keys, or none; the fidelity studies
    # keep more true mass at equal K/V with it on all three models (most on Qwen2.5: fidelity-qwen05/)
    center: str = "calibrate"
    calibrate_tokens: int = 4096  # prefill keys the "calibrate" mean is taken over before it is fixed
    rounding: str = "nearest"  # INT4 query rounding: nearest or random (unbiased)
    # bits per dimension of the key codes: each one about halves the estimate's error, and adds D/8 bytes
    # per token and kv-head to the index and to each step's score pass
    key_bits: int | None = None
    seed: int = 0  # seed of the random rotations

    def __post_init__(self) -> None:
        check_fraction(max_budget=self.max_budget)
        if self.top_p is not None:
            check_fraction(top_p=self.top_p)
        if self.score_temperature is not None and not (0.0 < float(self.score_temperature) <= 4.0):
            raise ValueError(f"score_temperature must be in (0, 4], got {self.score_temperature}")
        check_non_negative(
            sink=self.sink, window=self.window, dense_layers=self.dense_layers, seed=self.seed
        )
        if self.min_batch_context is not None:
            check_non_negative(min_batch_context=self.min_batch_context)
        for name in ("encode_chunk", "calibrate_tokens"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        check_choice("center", self.center, CENTER_MODES)
        check_choice("top_p_scope", self.top_p_scope, TOP_P_SCOPES)
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        if self.key_bits is not None:
            check_key_bits(self.key_bits)

    def for_head_dim(self, head_dim: int) -> "RaBitQConfig":
        """This config with its ``None`` fields set for a model of ``head_dim`` (flags given stay)."""
        bits = self.key_bits if self.key_bits is not None else default_key_bits(head_dim)
        top_p, temperature = default_selection(bits)
        return replace(self, key_bits=bits, top_p=top_p if self.top_p is None else self.top_p,
                       score_temperature=temperature if self.score_temperature is None else self.score_temperature)

    @classmethod
    def from_server_args(cls, server_args) -> "RaBitQConfig":
        """Read ``server_args.rabitq_<field>`` for every field (defaults where a flag is absent)."""
        values = {}
        for f in fields(cls):
            v = getattr(server_args, f"rabitq_{f.name}", None)
            if v is not None:
                values[f.name] = v
        return cls(**values)

    def batch_context_threshold(self, kv_heads: int, head_dim: int, kv_itemsize: int) -> int:
        """``min_batch_context`` in tokens: as given, or the context whose K and V of one layer
        (``kv_heads`` of this GPU) fill ``AUTO_DENSE_KV_BYTES``."""
        if self.min_batch_context is not None:
            return int(self.min_batch_context)
        return AUTO_DENSE_KV_BYTES // (2 * kv_heads * head_dim * kv_itemsize)
