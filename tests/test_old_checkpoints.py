"""Checkpoints written before the run directory got its own module (format v1) still load and
resume, and a resumed run ends where the old code's uninterrupted run ended.

The files in ``tests/fixtures/checkpoint-v1`` were written by cbp at commit 78925a4 with
``make.py`` there: for each multiplier rule, a tiny run (``tiny_run.py``) uninterrupted, and the
same run stopped by SIGINT in the middle of epoch 3.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import tiny_run
import torch

from cbp.files.checkpoint import FORMAT, FORMAT_V1, load_checkpoint
from cbp.training.runs import CHECKPOINT_NAME, LOG_NAME, read_jsonl
from cbp.training.train import fit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint-v1")


def copy(name: str, tmp_path) -> str:
    out = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), out)
    return out


def assert_rows_match(rows: list[dict], old: list[dict]) -> None:
    """Same epochs and decisions; the sums equal to rounding (the loss is now summed in float64).

    The rows written after the resume add the oscillation columns (counted from the resume on: a
    v1 checkpoint holds no oscillation state)."""
    assert len(rows) == len(old)
    oscillation = {"flips_per_step", "oscillations_per_step", "oscillation_frequency",
                   "late_flippers", "level_changes"}
    for row, ref in zip(rows, old):
        assert row.keys() - ref.keys() in (set(), oscillation) and ref.keys() <= row.keys()
        for key, value in ref.items():
            if key == "seconds":
                continue
            if isinstance(value, float) and key not in ("g", "lr"):
                assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row["epoch"], key)
            else:
                assert row[key] == value, (row["epoch"], key)


@pytest.mark.parametrize("rule", ["adam", "plain"])
def test_old_mid_epoch_checkpoint_resumes_to_the_old_result(rule, tmp_path):
    out = copy(f"{rule}-interrupted", tmp_path)
    old = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    assert (old["format"], old["epoch"], old["step"]) == (FORMAT_V1, 2, 2)
    assert "epoch_sum" in old["cbp"]          # the old layout: loss and penalty summed together
    with torch_threads(1):
        rows = fit(tiny_run.build(out, rule), resume=True)

    new = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    ref = load_checkpoint(os.path.join(FIXTURES, f"{rule}-reference", CHECKPOINT_NAME))
    assert new["format"] == FORMAT and (new["epoch"], new["step"]) == (tiny_run.EPOCHS, 0)
    # equal up to float rounding: the fixture's CPU and another CPU's kernels may round the last
    # digits differently (an H200 machine's 16-core host did; a resume bug moves far more)
    for key, tensor in ref["model"].items():
        torch.testing.assert_close(new["model"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    for name, lam in ref["cbp"]["multipliers"].items():
        torch.testing.assert_close(new["cbp"]["multipliers"][name], lam, rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert (new["cbp"]["g"], new["cbp"]["p"]) == (ref["cbp"]["g"], ref["cbp"]["p"]) == (3.0, 0)
    assert math.isinf(new["cbp"]["lagrangian_sum_pre"]) and float(new["cbp"]["penalty_sum"]) == 0
    old_rows = read_jsonl(os.path.join(FIXTURES, f"{rule}-reference", LOG_NAME))
    assert_rows_match(rows, old_rows)
    assert_rows_match(read_jsonl(os.path.join(out, LOG_NAME)), old_rows)


def test_old_epoch_end_checkpoint_continues(tmp_path):
    out = copy("adam-reference", tmp_path)
    run = tiny_run.build(out, "adam")
    run.epochs = tiny_run.EPOCHS + 1
    with torch_threads(1):
        rows = fit(run, resume=True)
    assert [r["epoch"] for r in rows] == list(range(1, tiny_run.EPOCHS + 2))
    assert rows[-1]["g"] == 3.0 and not rows[-1]["updated"]   # p = 1 of p_max 3: no update yet
    assert load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["epoch"] == tiny_run.EPOCHS + 1


class torch_threads:
    """One thread: the tiny steps would only wait on each other on shared cores."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
