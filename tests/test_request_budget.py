"""Per-request budgets: counts move to the ring on the device when a row changes request, and a
collect reports each ended request once, with its own counts."""

import torch
from conftest import DEVICE

from sglang_rabitq import request_budget as RB


def step(rb, rows, attended, seq):
    dev = dict(device=DEVICE)
    rb.add_step(torch.tensor(rows, **dev), torch.tensor(seq, **dev), torch.tensor(attended, **dev), 1)


def test_rows_that_change_request_report_it_once_with_its_counts():
    rb = RB.RequestBudgets(4, DEVICE, export_metrics=False)
    rows = lambda *r: torch.tensor(r, device=DEVICE)  # noqa: E731
    rb.start(rows(0, 2), ["a", "b"])
    step(rb, [0, 2], [30, 10], [100, 40])
    step(rb, [0, 2, 1], [50, 20, 5], [101, 41, 1])  # row 1: CUDA-graph padding (seq_len 1), not counted
    rb.start(rows(2), ["b"])  # a chunked prefill continuing request b: nothing ends
    rb.start(rows(0, 3), ["c", "d"])  # row 0 now serves c: a ended
    step(rb, [0], [7], [20])
    rb.collect()
    assert rb.finished == [{"rid": "a", "budget": 80 / 201, "decode_steps": 2}]
    rb.start(rows(2, 0), ["e", "f"])  # b and c end
    rb.collect()
    assert [(r["rid"], r["budget"], r["decode_steps"]) for r in rb.finished[1:]] == [("b", 30 / 81, 2), ("c", 7 / 20, 1)]
    assert rb.counts[[0, 2]].sum() == 0 and rb.lost == 0
    rb.collect()  # nothing new
    assert len(rb.finished) == 3


def test_more_ended_requests_than_the_ring_holds_are_counted_lost(monkeypatch):
    monkeypatch.setattr(RB, "RING_SIZE", 4)
    rb = RB.RequestBudgets(1, DEVICE, export_metrics=False)
    row = torch.tensor([0], device=DEVICE)
    for i in range(7):
        rb.start(row, [f"r{i}"])
        step(rb, [0], [i + 1], [10])
    rb.start(row, ["last"])
    rb.collect()
    assert rb.lost == 3 and [r["rid"] for r in rb.finished] == ["r3", "r4", "r5", "r6"]
    assert [r["budget"] for r in rb.finished] == [0.4, 0.5, 0.6, 0.7]
    # the lost requests leave no host state behind; the request still serving keeps its key
    assert list(rb._rids.values()) == ["last"] and list(rb._keys) == ["last"]
