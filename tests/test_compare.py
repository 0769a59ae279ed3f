"""The comparison harness (benchmarks/compare.py) end to end on a tiny subset, plus its pieces.

The run is the ``--quick`` size cut to one level set; every method must produce a row with values
in range. The BatchNorm re-estimation is checked against statistics computed by hand.
"""

import importlib.util
import math
import os
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import cbp
from cbp.baselines import post_training_rounding, recalibrate_batchnorm

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare.py")
_spec = importlib.util.spec_from_file_location("bench_compare", _PATH)
compare = sys.modules["bench_compare"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(compare)


def test_recalibrate_batchnorm_is_the_plain_average_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, momentum=0.3))
    model.eval()
    batches = [torch.randn(4, 1, 3, 3) * (i + 1) for i in range(3)]
    recalibrate_batchnorm(model, [(x, None) for x in batches], batches=2)
    with torch.no_grad():
        acts = [model[0](x) for x in batches[:2]]
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts]).mean(0)
    bn = model[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.3 and not model.training


def test_recalibrate_batchnorm_rejects_bad_input():
    with pytest.raises(ValueError, match="batches must be >= 1"):
        recalibrate_batchnorm(nn.BatchNorm1d(2), [], 0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)], 1)
    with pytest.raises(ValueError, match="fewer than"):
        recalibrate_batchnorm(nn.BatchNorm1d(2), [torch.randn(3, 2)], 2)


def test_post_training_rounding_forward_is_the_converted_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    data = [torch.randn(8, 3) for _ in range(3)]
    post_training_rounding(model, cbp.CBPConfig("ternary"), data, batches=3).eval()
    plain = cbp.convert(model)
    levels = model[1].levels
    assert set(plain[1].weight.unique().tolist()) <= set(levels.tolist())
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_schedule_reaches_g_final_and_drops_lr_at_g_20():
    epochs, drop = compare.schedule(compare.FULL)
    # g = 1..10 (9 updates), 20 (10th: lr drop), ..., 100 (18th), 200 (19th) > stop_once_g_exceeds
    assert (epochs, drop) == (19 * compare.FULL.p_max, 10 * compare.FULL.p_max)


def test_quick_comparison_produces_every_row_in_range(tmp_path):
    size = replace(compare.QUICK, seeds=2)
    results = compare.run_all(size, str(tmp_path), levels=["binary"])
    methods = {r["method"] for r in results}
    expected = set(compare.METHODS) - ({"brevitas"} if compare.brevitas_missing() else set())
    assert methods == expected
    epochs, _ = compare.schedule(size)
    for r in results:
        assert 0 <= r["top1"] <= r["top5"] <= 100
        if r["method"] != "fp":
            assert r["cfs"] >= 0 and 0 <= r["on_levels"] <= 1
        if r["method"] in ("ste", "no_window", "cbp", "brevitas"):
            assert r["epochs"] == epochs and r["sec_per_epoch"] > 0
    cbp_runs = [r for r in results if r["method"] == "cbp"]
    assert len(cbp_runs) == 2 and all(r["g"] > size.stop_once_g_exceeds for r in cbp_runs)
    assert all(math.isinf(r["g"]) for r in results if r["method"] == "no_window")
    text = compare.table(results, size, ["binary"])
    for method in expected:
        assert compare.LABELS[method] in text
    assert "CBP − STE-only" in text and "±" in text


def test_table_rows_and_verdicts_by_hand():
    """The numbers the README's comparison rests on: mean ± sample std over seeds, and a
    difference called real only beyond the two spreads added."""
    def row(method, top1, **extra):
        return {"method": method, "levels": "binary", "top1": top1, "top5": 99.0, "cfs": 1e-3,
                "on_levels": 0.5, "sec_per_epoch": 2.0, **extra}
    results = [row("fp", 92.0), row("fp", 92.0),
               row("cbp", 90.0), row("cbp", 91.0),              # 90.50 ± 0.71
               row("ste", 88.5), row("ste", 89.5),              # 89.00 ± 0.71: 1.50 > 1.41
               row("no_window", 90.0), row("no_window", 90.4)]  # 90.20 ± 0.28: 0.30 < 0.99
    text = compare.table(results, compare.QUICK, ["binary"])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert lines[compare.LABELS["cbp"]].startswith(
        f"| {compare.LABELS['cbp']} | 90.50 ± 0.71 | 99.00 ± 0.00 | 1.00e-03 ± 0.00e+00 |")
    assert lines[compare.LABELS["fp"]].startswith(f"| {compare.LABELS['fp']} | 92.00 ± 0.00 |")
    assert f"| {compare.LABELS['rounding']} | not run |" in text
    assert ("top-1 differences: CBP − STE-only: +1.50 (real); CBP − no-window: +0.30 (within "
            "spread); FP − STE-only: +3.00 (real)") in text
