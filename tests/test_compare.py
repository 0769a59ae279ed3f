"""The comparison harness (benchmarks/compare.py) end to end on a tiny subset, plus its pieces.

The run is the ``--quick`` size cut to the primary model and one level set; every method must
produce a row with values in range. The paired statistics are checked against hand-computed
differences. (The baselines it compares, cbp.core.baselines, are tested in test_baselines.py.)
"""

import importlib.util
import math
import os
import statistics
import sys
from dataclasses import replace

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare.py")
_spec = importlib.util.spec_from_file_location("bench_compare", _PATH)
compare = sys.modules["bench_compare"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(compare)
import paired  # noqa: E402  (benchmarks/, on the path once compare.py is loaded)


def test_schedule_reaches_g_final_and_drops_lr_at_g_20():
    epochs, drop = compare.schedule(compare.FULL)
    # g = 1..10 (9 updates), 20 (10th: lr drop), ..., 100 (18th), 200 (19th) > g_final
    assert (epochs, drop) == (19 * compare.FULL.p_max, 10 * compare.FULL.p_max)


def test_paired_differences_mean_se_t_test_and_signs():
    base = [{"seed": s, "top1": v} for s, v in enumerate([80.0, 81.0, 79.0, 80.5, 80.0])]
    better = [{"seed": s, "top1": v} for s, v in enumerate([81.0, 81.5, 80.0, 81.5, 80.5])]
    d = paired.paired(better, base, "top1")
    diffs = [1.0, 0.5, 1.0, 1.0, 0.5]
    se = statistics.stdev(diffs) / math.sqrt(5)
    assert d.mean == pytest.approx(0.8) and d.se == pytest.approx(se)
    # t = 0.8 / 0.1225 = 6.53 with 4 degrees of freedom: two-sided p = 0.00283 (t table)
    assert d.mean / d.se == pytest.approx(6.532, abs=1e-3)
    assert d.p == pytest.approx(0.00283, abs=2e-5)
    assert (d.above, d.below, d.n, d.agree) == (5, 0, 5, 1.0)
    unpaired = [{"seed": 7, "top1": 1.0}]          # no common seed: no contrast
    assert paired.paired(unpaired, base, "top1") is None


def test_holm_step_down_by_hand():
    def c(p):
        return paired.Contrast(mean=1.0, se=0.1, p=p, above=3, below=0, n=3)

    # m = 4 at alpha 0.05: 0.010 <= 0.0125, 0.016 <= 0.0167, 0.030 > 0.025 stops the procedure
    family = [c(0.030), c(0.010), c(0.040), c(0.016)]
    paired.holm(family + [None])
    assert [x.real for x in family] == [False, True, False, True]
    # uncorrected, 0.030 and 0.040 would pass; alone, each passes
    lone = c(0.040)
    paired.holm([lone])
    assert lone.real
    # a p-value that passes its own threshold after a failure is still a tie (step-down stops)
    family = [c(0.02), c(0.02)]
    paired.holm(family)
    assert [x.real for x in family] == [True, True]   # 0.02 <= 0.025, then 0.02 <= 0.05
    family = [c(0.03), c(0.03)]
    paired.holm(family)
    assert [x.real for x in family] == [False, False]  # 0.03 > 0.025 stops at once


def test_table_verdicts_follow_holm_over_the_table():
    """Three seeds of +1 ± small noise: p ~ 0.002 alone is real; a table holding many such
    contrasts corrects them all together."""
    rows = [{"model": "mobilenet", "method": m, "levels": "binary", "seed": s, "top1": v,
             "top1_train_bn": v} for m, vals in (("ste", [80.0, 81.0, 79.0]),
                                                 ("dampen", [81.0, 82.1, 79.9]),
                                                 ("cbp_1e-4", [80.1, 80.9, 79.1]))
            for s, v in enumerate(vals)]
    text = "\n".join(compare.accuracy_table(rows, "mobilenet", "binary"))
    dampen = next(line for line in text.splitlines() if line.startswith("| STE + oscillation"))
    cbp_line = next(line for line in text.splitlines() if line.startswith("| CBP"))
    assert "**real**" not in cbp_line and "tie" in cbp_line
    assert "3+/0−" in dampen and "**real**" in dampen   # t 17.3, p 0.003 <= 0.05 / 4


def test_cell_key_follows_settings_and_code_version_not_seed_counts(tmp_path):
    version = {"code": "abc", "device": "the CPU", "torch": "x", "brevitas": None}
    key = compare.cell_key(compare.QUICK, version)
    assert compare.cell_key(replace(compare.QUICK, seeds_primary=9), version) == key
    assert compare.cell_key(replace(compare.QUICK, budget=4), version) != key
    assert compare.cell_key(compare.QUICK, {**version, "code": "abd"}) != key
    assert compare.cell_key(compare.QUICK, {**version, "device": "H100"}) != key
    # the live version hashes the cbp sources: the same twice in a process, and it names torch
    live = compare.code_version("cpu")
    assert live["torch"] == torch.__version__ and len(live["code"]) == 12


def test_results_file_merges_replaces_and_never_mixes_versions(tmp_path):
    path = str(tmp_path / "r.jsonl")
    cell = {"model": "mobilenet", "method": "ste", "levels": "binary", "seed": 0, "key": "k1",
            "version": {"code": "a"}, "top1": 80.0}
    compare.save_results(path, [cell, {**cell, "seed": 1}])
    compare.save_results(path, [{**cell, "top1": 81.0}, {**cell, "key": "k2", "version": {"code": "b"}}])
    rows = compare.read_results(path)
    assert len(rows) == 3 and not os.path.exists(path + ".tmp")
    assert {r["top1"] for r in rows if r["key"] == "k1" and r["seed"] == 0} == {81.0}
    assert compare.read_results(str(tmp_path / "none.jsonl")) == []
    with pytest.raises(ValueError, match="2 code versions"):
        compare.one_version(rows)
    assert '"a"' in compare.one_version([r for r in rows if r["key"] == "k1"])


def test_the_default_plan_is_the_primary_cell_without_the_two_quiet_methods():
    """The default run (issue 22's 25-minute cap): the binary MobileNetV2 with every headline
    method but Nagel's published freezing thresholds and the eta 1e-4 no-window ablation."""
    assert compare.DEFAULT_PLAN == (("mobilenet", "binary", compare.DEFAULT_METHODS),)
    assert set(compare.HEADLINE) - set(compare.DEFAULT_METHODS) == {"freeze", "no_window_1e-4"}


def test_budget_stretches_every_epoch_and_the_ladder_plan():
    assert replace(compare.FULL, budget=4).steps_per_epoch == 4 * compare.FULL.epoch_iters
    import ladder
    rungs = {(s.budget, model, s.seeds_primary) for s, model, _, _ in ladder.plan([1, 4, 16])}
    assert rungs == {(1, "mobilenet", 10), (1, "resnet", 10), (4, "mobilenet", 5),
                     (4, "resnet", 5), (16, "mobilenet", 3)}
    quick = ladder.plan([1], compare.QUICK)
    assert all(s.seeds_primary == compare.QUICK.seeds_primary for s, *_ in quick)


def test_quick_comparison_produces_every_row_in_range(tmp_path):
    methods = [m for m in compare.HEADLINE if m not in ("cbp_1e-4", "cbp_1e-3")]
    headline = (("mobilenet", "binary", compare.HEADLINE),)   # every method of the primary cell
    results = compare.run_all(compare.QUICK, str(tmp_path), headline, methods,
                              ["binary"], ["mobilenet"], jobs=1)
    expected = set(methods) - ({"brevitas", "brevitas_noclamp"} if compare.brevitas_missing() else set())
    assert {r["method"] for r in results} == expected
    epochs, drop = compare.schedule(compare.QUICK)
    for r in results:
        assert 0 <= r["top1"] <= 100 and 0 <= r["top1_train_bn"] <= 100
        if r["method"] in compare.TRAINED:
            assert (r["epochs"], r["lr_drop_epoch"]) == (epochs, None if drop >= epochs else drop + 1)
        if r["method"] not in ("fp", "rounding") and not r["method"].startswith("brevitas"):
            assert r["flips_per_step"] >= r["oscillations_per_step"] >= 0
            assert 0 <= r["late_flippers"] <= r["level_changes"] + r["late_flippers"] <= 2
            assert 0 < r["tracker_share"] < 1
        if r["method"] != "fp":
            assert r["bn_gap"] == pytest.approx(r["top1"] - r["top1_train_bn"])
    gs = {r["method"]: r.get("g") for r in results if r["seed"] == 0}
    assert gs["ste"] == gs["cbp_1e-2"] > compare.QUICK.g_final and math.isinf(gs["no_window"])
    assert len([r for r in results if r["method"] == "ste"]) == compare.QUICK.seeds_primary
    text = compare.table(results, compare.QUICK)
    for method in expected:
        assert compare.LABELS[method] in text
    assert "Δ vs STE-only (paired)" in text and "flips / step" in text
    # a second run with reuse reads every cell from its result file
    again = compare.run_all(compare.QUICK, str(tmp_path), headline, methods,
                            ["binary"], ["mobilenet"], jobs=1, reuse=True)
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    assert sorted(again, key=key) == sorted(results, key=key)


def test_ladder_tables_take_committed_cells_of_one_version_only():
    import ladder

    size = replace(compare.FULL, budget=4, seeds_primary=2)
    cell = {"model": "mobilenet", "method": "ste", "levels": "binary", "seed": 0, "budget": 4,
            "key": "k1"}
    rows = [cell, {**cell, "seed": 1}, {**cell, "seed": 2}, {**cell, "budget": 1, "key": "k0"},
            {**cell, "method": "fp", "levels": "-"}, {**cell, "levels": "ternary", "key": "k9"}]
    got = ladder.committed(rows, size, "mobilenet", "binary", ("fp", "ste"))
    assert sorted((r["method"], r["seed"]) for r in got) == [("fp", 0), ("ste", 0), ("ste", 1)]
    with pytest.raises(ValueError, match="2 settings or code versions"):
        ladder.committed(rows + [{**cell, "seed": 1, "key": "k2"}], size, "mobilenet", "binary",
                         ("ste",))
