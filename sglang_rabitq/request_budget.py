"""Per-request decode budget: tokens attended / context tokens over a request's decode steps.

Counters live per request-pool row on the device and are added to inside decode steps (CUDA graphs
too). Extend batches name each row's request: when a row starts serving a new request, the previous
request there has finished; its counts are moved into a ring of ended requests and the row starts
afresh, all on the device (no host sync on the scheduler's path). The host reads the ring when the
backend logs (``collect``): each ended request is reported at info level, observed in the
``sglang_rabitq_request_budget`` histogram (--enable-metrics) and kept in ``finished``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("sglang_rabitq")

RING_SIZE = 4096  # ended requests held between two collects; older ones beyond it are counted as lost


class RequestBudgets:
    def __init__(self, num_rows: int, device, export_metrics: bool):
        # [attended, context, steps] per row; the extra last row takes CUDA-graph padding rows
        self.counts = torch.zeros(num_rows + 1, 3, dtype=torch.int64, device=device)
        self.dump_row = num_rows
        self.row_key = torch.zeros(num_rows, dtype=torch.int64, device=device)  # request served (0: none)
        # (key, attended, context, steps) of ended requests; the extra last entry takes rows that did not end
        self.ring = torch.zeros(RING_SIZE + 1, 4, dtype=torch.int64, device=device)
        self.ring_written = torch.zeros((), dtype=torch.int64, device=device)
        self._ring_read = 0
        self._keys: dict = {}  # rid -> key of the requests not yet reported
        self._rids: dict[int, object] = {}  # key -> rid
        self._next_key = 1
        self.lost = 0  # ended requests overwritten in the ring before a collect read them
        self.finished: list[dict] = []  # most recent reports, newest last (bounded)
        self._hist = self._make_histogram() if export_metrics else None

    @staticmethod
    def _make_histogram():
        try:
            from prometheus_client import Histogram
        except ImportError:
            return None
        buckets = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
        return Histogram("sglang_rabitq_request_budget", "RaBitQ decode budget per finished request", buckets=buckets)

    def add_step(self, rows: torch.Tensor, seq_lens: torch.Tensor, attended: torch.Tensor, num_kv_heads: int) -> None:
        """One decode step (device ops only): ``attended [B]`` token-heads, context ``seq_lens * num_kv_heads``."""
        real = seq_lens > 1  # CUDA-graph padding rows carry seq_len 1
        rows = torch.where(real, rows.to(torch.int64), self.dump_row)
        step = torch.stack([attended.to(torch.int64), seq_lens.to(torch.int64) * num_kv_heads,
                            torch.ones_like(rows)], dim=1)
        self.counts.index_add_(0, rows, step)

    def _key(self, rid) -> int:
        key = self._keys.get(rid)
        if key is None:
            key = self._keys[rid] = self._next_key
            self._rids[key] = rid
            self._next_key += 1
        return key

    def start(self, rows: torch.Tensor, rids: list) -> torch.Tensor:
        """An extend batch's rows (device) and request ids: rows that changed request hand their counts
        to the ring and restart (device ops; the keys travel through pinned memory, without a sync).
        Returns, per row, whether it goes on with the request it served before (a later prefill chunk)."""
        keys = torch.tensor([self._key(rid) for rid in rids], dtype=torch.int64)
        if rows.is_cuda:
            keys = keys.pin_memory().to(rows.device, non_blocking=True)
        rows = rows.to(torch.int64)
        old = self.row_key[rows]
        changed = old != keys
        ended = changed & (old != 0)
        counts = self.counts[rows]
        at = torch.where(ended, (self.ring_written + torch.cumsum(ended, 0) - 1) % RING_SIZE, RING_SIZE)
        self.ring[at] = torch.cat([old[:, None], counts], dim=1)
        self.ring_written += ended.sum()
        self.counts[rows] = torch.where(changed[:, None], 0, counts)
        self.row_key[rows] = keys
        return ~changed

    def collect(self) -> None:
        """Report the requests that ended since the last collect (one host sync; the backend calls it
        when it logs)."""
        written = int(self.ring_written)
        first = max(self._ring_read, written - RING_SIZE)
        lost = first - self._ring_read
        self.lost += lost
        if written > first:
            at = torch.arange(first, written, device=self.ring.device) % RING_SIZE
            for key, attended, context, steps in self.ring[at].tolist():
                self._report(self._forget(key), attended, context, steps)
        if lost:  # the lost requests' keys: every key no row serves any more
            serving = set(self.row_key.tolist())
            for key in [k for k in self._rids if k not in serving]:
                self._forget(key)
        self._ring_read = written

    def _forget(self, key: int):
        rid = self._rids.pop(key, None)
        self._keys.pop(rid, None)
        return rid

    def _report(self, rid, attended: int, context: int, steps: int) -> None:
        if steps == 0:
            return
        budget = attended / context if context else None
        self.finished = (self.finished + [{"rid": rid, "budget": budget, "decode_steps": steps}])[-256:]
        logger.info("rabitq: request %s decode budget %.3f over %d steps", rid, budget or 0.0, steps)
        if self._hist is not None and budget is not None:
            self._hist.observe(budget)
