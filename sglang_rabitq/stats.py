"""Observability: decode budget, codes reused vs encoded, encode time.

Counters live on the device (updated without a host sync, inside CUDA graphs too) and are read
at most every ``LOG_EVERY_S`` seconds, when they are logged at info level and exported as
Prometheus counters (``--enable-metrics``).
"""

from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger("sglang_rabitq")
LOG_EVERY_S = float(os.environ.get("SGLANG_RABITQ_LOG_EVERY_S", "10"))  # 0: after every batch
# dense_fallback_requests: decode rows past the workspace's capacity (see DecodePlan), attended densely;
# dense_steps: decode steps whose batch context was below --rabitq-min-batch-context (every layer dense)
FIELDS = ("attended_tokens", "context_tokens", "codes_reused", "codes_encoded", "decode_steps", "dense_fallback_requests",
          "dense_steps")


class RaBitQStats:
    def __init__(self, device, export_metrics: bool):
        self.counters = torch.zeros(len(FIELDS), dtype=torch.int64, device=device)
        self.encode_seconds = 0.0
        self._index = {}  # field tuple -> device index tensor of add_many
        self._pending = []  # (start, end) CUDA events of encode launches, resolved when logging
        self._exported = dict.fromkeys(FIELDS, 0)
        self._exported_seconds = 0.0
        self._last_log = time.monotonic()
        self._prom = self._make_prometheus() if export_metrics else None

    @staticmethod
    def _make_prometheus():
        try:
            from prometheus_client import Counter
        except ImportError:  # metrics were asked for but the client is missing: log only
            return None
        names = {f: Counter(f"sglang_rabitq_{f}", f"RaBitQ {f.replace('_', ' ')}") for f in FIELDS}
        names["encode_seconds"] = Counter("sglang_rabitq_encode_seconds", "RaBitQ prefill encode time (s)")
        return names

    def add_many(self, fields: tuple[str, ...], values: torch.Tensor) -> None:
        """Add a device vector to several counters in one launch (no host sync)."""
        idx = self._index.get(fields)
        if idx is None:
            idx = self._index[fields] = torch.tensor([FIELDS.index(f) for f in fields], device=self.counters.device)
        self.counters.index_add_(0, idx, values.to(self.counters.dtype))

    def time_encode(self, fn) -> None:
        """Run ``fn`` (kernel launches) and account its device time without waiting for it."""
        if self.counters.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            self.encode_seconds += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        self._pending.append((start, end))

    def snapshot(self) -> dict:
        """Current totals (one host sync)."""
        for start, end in self._pending:
            end.synchronize()
            self.encode_seconds += start.elapsed_time(end) / 1000.0
        self._pending.clear()
        values = dict(zip(FIELDS, self.counters.tolist()))
        values["encode_seconds"] = self.encode_seconds
        values["budget"] = values["attended_tokens"] / values["context_tokens"] if values["context_tokens"] else None
        return values

    def maybe_log(self) -> bool:
        """Log (and export) the totals if ``LOG_EVERY_S`` has passed since the last time; says whether it did."""
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            return False
        self._last_log = now
        snap = self.snapshot()
        budget = "n/a" if snap["budget"] is None else f"{snap['budget']:.3f}"
        logger.info(
            "rabitq: decode budget %s (attended %d of %d token-heads over %d steps, %d of them dense), codes reused %d, "
            "encoded %d, prefill encode %.2f s, dense fallback %d request-steps",
            budget, snap["attended_tokens"], snap["context_tokens"], snap["decode_steps"], snap["dense_steps"],
            snap["codes_reused"], snap["codes_encoded"], snap["encode_seconds"], snap["dense_fallback_requests"],
        )
        if self._prom is not None:
            for f in FIELDS:
                self._prom[f].inc(snap[f] - self._exported[f])
                self._exported[f] = snap[f]
            self._prom["encode_seconds"].inc(snap["encode_seconds"] - self._exported_seconds)
            self._exported_seconds = snap["encode_seconds"]
        return True
