"""eval/operating_point.py: the cheapest configuration within a score drop of dense, at one context."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.operating_point import pick  # noqa: E402


def rows(context, dense, configs):
    """Two tasks per configuration; ``configs``: {(top_p, temperature): ((score, score), budget)}."""
    out = [{"task": t, "context": context, "backend": "dense", "top_p": None, "score": s, "budget": None}
           for t, s in zip(("a", "b"), dense)]
    for (p, temp), (scores, budget) in configs.items():
        out += [{"task": t, "context": context, "backend": "rabitq", "top_p": p, "score_temperature": temp,
                 "score": s, "budget": budget} for t, s in zip(("a", "b"), scores)]
    return out


def test_the_cheapest_configuration_within_the_drop_wins():
    r = rows(32768, (60, 40), {(0.9, 0.6): ((60, 40), 0.5), (0.8, 1.0): ((60, 39), 0.15),
                               (0.7, 1.0): ((50, 40), 0.1)})
    r += rows(4096, (100, 100), {(0.5, 1.0): ((100, 100), 0.01)})  # another context: ignored
    assert pick(r, 32768, 1.0) == ((("rabitq", 0.8, 1.0)), 0.5, True)
    assert pick(r, 32768, 0.0) == ((("rabitq", 0.9, 0.6)), 0.0, True)


def test_without_any_within_the_drop_the_closest_then_cheapest_is_named():
    r = rows(8192, (80, 80), {(0.9, None): ((70, 80), 0.4), (0.95, None): ((80, 70), 0.3), (0.8, None): ((60, 60), 0.1)})
    assert pick(r, 8192, 1.0) == (("rabitq", 0.95, None), 5.0, False)


def test_a_run_without_dense_or_rabitq_at_the_context_is_refused():
    with pytest.raises(ValueError, match="dense"):
        pick(rows(8192, (80, 80), {})[2:], 8192, 1.0)
    with pytest.raises(ValueError, match="no rabitq"):
        pick(rows(8192, (80, 80), {}), 8192, 1.0)
    with pytest.raises(ValueError, match="dense"):
        pick(rows(8192, (80, 80), {(0.9, None): ((80, 80), 0.2)}), 4096, 1.0)
