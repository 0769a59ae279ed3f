"""benchmarks/loop_time.py at a tiny size: both loops run, do the same steps, and give a ratio."""

import os
import statistics
import sys
from unittest import mock

import pytest

from cbp.core.lagrangian import Lagrangian

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import loop_time  # noqa: E402

TINY = ["--batch-size", "8", "--limit", "64", "--val-limit", "16", "--quiet"]


def test_compare_gives_both_sides_and_their_ratio():
    results = loop_time.compare(["resnet20-pretrain"], steps=2, epochs=1, repeat=1, extra=TINY)
    r = results["resnet20-pretrain"]
    assert len(r["cbp"]) == len(r["plain"]) == 1
    assert all(s > 0 for s in r["cbp"] + r["plain"])
    assert r["ratio"] == pytest.approx(statistics.median(r["cbp"]) / statistics.median(r["plain"]))


@pytest.mark.parametrize("side", ["cbp", "plain"])
def test_both_sides_take_the_same_cbp_steps(side):
    """3 steps in each of 2 epochs: six Lagrangian steps and two epoch ends on either side."""
    calls = {"step": 0, "end_epoch": 0}

    def counting(name):
        original = getattr(Lagrangian, name)

        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    with mock.patch.object(Lagrangian, "step", counting("step")), \
            mock.patch.object(Lagrangian, "end_epoch", counting("end_epoch")):
        seconds = loop_time.time_side("gpt-quantize", side, steps=6, epochs=2,
                                      extra=TINY + ["--batch-size", "2"])
    assert seconds > 0
    assert calls == {"step": 6, "end_epoch": 2}
