"""Per-request decode budget: tokens attended / context tokens over a request's decode steps.

Counters live per request-pool row on the device and are added to inside decode steps (CUDA graphs
too). A row's request is known from the extend batches (eager, host-side): when a row starts serving
a new request id, the previous request there has finished, and its budget is reported (info log,
``sglang_rabitq_request_budget`` histogram with --enable-metrics, and ``finished``).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("sglang_rabitq")


class RequestBudgets:
    def __init__(self, num_rows: int, device, export_metrics: bool):
        # [attended, context, steps] per row; the extra last row takes CUDA-graph padding rows
        self.counts = torch.zeros(num_rows + 1, 3, dtype=torch.int64, device=device)
        self.dump_row = num_rows
        self.rid = [None] * num_rows
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

    def start(self, rows: list[int], rids: list) -> None:
        """An extend batch's rows and request ids: report and reset rows that changed request."""
        ended = [(row, self.rid[row]) for row, rid in zip(rows, rids) if self.rid[row] not in (None, rid)]
        if ended:
            idx = torch.tensor([row for row, _ in ended], device=self.counts.device)
            values = self.counts[idx].tolist()  # one host sync, extend batches only
            self.counts.index_fill_(0, idx, 0)
            for (_, rid), (attended, context, steps) in zip(ended, values):
                self._report(rid, attended, context, steps)
        for row, rid in zip(rows, rids):
            self.rid[row] = rid

    def _report(self, rid, attended: int, context: int, steps: int) -> None:
        if steps == 0:
            return
        budget = attended / context if context else None
        self.finished = (self.finished + [{"rid": rid, "budget": budget, "decode_steps": steps}])[-256:]
        logger.info("rabitq: request %s decode budget %.3f over %d steps", rid, budget or 0.0, steps)
        if self._hist is not None and budget is not None:
            self._hist.observe(budget)
