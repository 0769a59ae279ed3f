"""Every command-line flag and every packaged config reaches the objects that run.

``cbp quantize`` / ``cbp pretrain`` go through the real CLI up to the training loop, which is
replaced by one that records the :class:`cbp.training.train.Run` it is handed: its ``CBPConfig`` (through
the Lagrangian), optimizer, scheduler, data and loop settings are compared with values written
out by hand here, not derived from the parser.
"""

from __future__ import annotations

import sys

import pytest
import torch

import cbp
import cbp.training.train
from cbp.cli import commands as cli
from cbp.cli.options import build_parsers


@pytest.fixture
def runs(monkeypatch) -> list:
    """The Runs the CLI would train, wherever in cbp the training loop is called from."""
    recorded = []

    def record(run, resume=False):
        recorded.append(run)
        return []
    fit = cbp.training.train.fit
    for name, module in list(sys.modules.items()):
        if (name == "cbp" or name.startswith("cbp.")) and getattr(module, "fit", None) is fit:
            monkeypatch.setattr(module, "fit", record)
    return recorded


def run_of(runs: list, argv: list[str]):
    runs.clear()
    cli.main_or_raise(argv)
    (run,) = runs
    return run


# Every quantize option: a value other than its default. Options about where things come from or
# go (checked by the end-to-end tests) are listed apart.
QUANTIZE_FLAGS = {
    "--constraint": ["custom"], "--levels": ["-1,-0.25,0,2"], "--multiplier-lr": ["0.03"],
    "--multiplier-rule": ["plain"], "--p-max": ["7"], "--g-init": ["2.5"], "--stop-once-g-exceeds": ["300"],
    "--lr-drop-at-g": ["40"], "--lr-drop-factor": ["0.3"], "--grad-clip": ["0.5"],
    "--weight-clamp": ["2"], "--no-initial-update": [], "--include": ["layer2", "layer3"],
    "--exclude": ["downsample"], "--quantize-first-last": [],
    "--epochs": ["3"], "--epoch-iters": ["2"], "--batch-size": ["16"], "--lr": ["0.02"],
    "--momentum": ["0.8"], "--weight-decay": ["3e-4"], "--seed": ["5"], "--workers": ["1"],
    "--no-channels-last": [], "--on-nan": ["lower-lr"], "--quiet": [], "--limit": ["40"],
    "--val-limit": ["24"], "--device": ["cpu"], "--g-increments": ["5:2,inf:7"],
    "--compile-penalty": [], "--distill": [], "--distill-alpha": ["0.8"],
    "--distill-temperature": ["3"], "--scale": ["per-channel"], "--checkpoint-every": ["30"],
}
ELSEWHERE = {"--from", "--model", "--weights", "--data", "--data-dir", "--download",
             "--image-size", "--out", "--resume", "--overwrite", "--config", "--sync-bn",
             "--optimizer",
             # the older spellings of CBPConfig's flags (tests/test_options.py)
             "--no-constraint", "--g-final", "--grad-clip-value", "--use-constraint",
             "--skip-first-last", "--initial-multiplier-update",
             # the oscillation fix and the final BN re-estimation, end to end in tests/test_cli.py
             "--oscillation-fix", "--recalibrate-bn",
             # distillation's other teacher, end to end in tests/test_distill.py
             "--teacher",
             # the packaged recipes: test_the_best_recipe_reaches_the_run below
             "--recipe"}


def options(command: str) -> set[str]:
    return {opt for action in build_parsers()[1][command].actions for opt in action.option_strings
            if not (opt.startswith("--no-") and f"--{opt[5:]}" in action.option_strings)}


def test_every_quantize_option_is_covered_here():
    covered = {f"--{f[5:]}" if f == "--no-channels-last" else f for f in QUANTIZE_FLAGS}
    assert options("quantize") == covered | ELSEWHERE


def test_every_quantize_flag_reaches_the_run(runs, pretrained, tiny_fashion, tmp_path):
    argv = ["quantize", "--from", pretrained, "--data-dir", tiny_fashion, "--out", str(tmp_path)]
    run = run_of(runs, argv + [token for flag, values in QUANTIZE_FLAGS.items()
                               for token in (flag, *values)])
    config = run.lagrangian.config
    assert config.factors == (-1.0, -0.25, 0.0, 2.0)
    assert (config.multiplier_lr, config.multiplier_rule, config.p_max) == (0.03, "plain", 7)
    assert (config.g_init, config.stop_once_g_exceeds, config.lr_drop_at_g) == (2.5, 300, 40)
    assert tuple(config.g_increments) == ((5, 2), (float("inf"), 7)) and config.compile_penalty
    assert (config.lr_drop_factor, config.grad_clip_value, config.weight_clamp) == (0.3, 0.5, 2)
    assert (config.initial_multiplier_update, config.use_constraint) == (False, True)
    assert (list(config.include), list(config.exclude)) == (["layer2", "layer3"], ["downsample"])
    assert config.skip_first_last is False
    assert run.lagrangian.g == 2.5
    assert run.lagrangian.state_dict()["ascent"]["param_groups"][0]["lr"] == 0.03
    layers = cbp.quantized_layers(run.model)
    assert layers and all(("layer2" in n or "layer3" in n) and "downsample" not in n
                          for n in layers)
    assert all(layer.cbp_factors.tolist() == [-1.0, -0.25, 0.0, 2.0] for layer in layers.values())
    assert config.scale == "per-channel" and run.meta["scale"] == "per-channel"
    assert all(layer.cbp_scale.shape == (layer.weight.shape[0], 1, 1, 1)
               for layer in layers.values())
    decay, no_decay = run.optimizer.param_groups
    assert (decay["lr"], decay["momentum"], decay["weight_decay"]) == (0.02, 0.8, 3e-4)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (0.02, 0.0)
    assert (run.epochs, run.epoch_iters, run.batch_size, run.seed) == (3, 2, 16, 5)
    assert (run.workers, run.channels_last, run.on_nan, run.show_progress) == (1, False,
                                                                              "lower-lr", False)
    assert run.checkpoint_every == 30
    assert (len(run.train_data), len(run.val_data)) == (40, 24)
    assert run.ctx.device == torch.device("cpu") and run.scheduler is None
    assert run.meta["levels"] == "custom" and run.meta["skip_first_last"] is False
    distill = run.distillation
    assert (distill.alpha, distill.temperature) == (0.8, 3) and not distill.teacher.training
    assert not cbp.quantized_layers(distill.teacher)   # the float model, as loaded from --from


@pytest.mark.parametrize("value, expected", [("none", None), ("off", None), ("inf", float("inf"))])
def test_switching_reference_extras_off(runs, pretrained, tiny_fashion, tmp_path, value,
                                        expected):
    run = run_of(runs, ["quantize", "--from", pretrained, "--data-dir", tiny_fashion, "--out",
                        str(tmp_path), "--grad-clip", value, "--weight-clamp", value,
                        "--lr-drop-at-g", value, "--stop-once-g-exceeds", value, "--no-constraint"])
    config = run.lagrangian.config
    assert (config.grad_clip_value, config.weight_clamp) == (expected, expected)
    assert (config.lr_drop_at_g, config.stop_once_g_exceeds) == (expected, expected)
    assert config.use_constraint is False and run.lagrangian.multipliers == {}


def test_quantize_defaults_are_the_papers(runs, pretrained, tiny_fashion, tmp_path):
    run = run_of(runs, ["quantize", "--from", pretrained, "--data-dir", tiny_fashion, "--out",
                        str(tmp_path)])
    config = run.lagrangian.config
    assert config.factors == (-1.0, 1.0) and config.skip_first_last
    assert (config.multiplier_lr, config.multiplier_rule, config.p_max) == (1e-4, "adam", 20)
    assert (config.g_init, config.stop_once_g_exceeds, config.lr_drop_at_g, config.lr_drop_factor) == (
        1.0, None, 20, 0.1)
    assert (config.grad_clip_value, config.weight_clamp) == (1.0, 1.0)
    assert config.use_constraint and config.initial_multiplier_update
    assert config.scale == "per-layer" and "scale" not in run.meta
    decay, _ = run.optimizer.param_groups
    assert (decay["lr"], decay["momentum"], decay["weight_decay"]) == (1e-3, 0.9, 1e-4)
    assert (run.epochs, run.batch_size, run.epoch_iters, run.on_nan) == (1000, 256, None, "stop")
    assert run.distillation is None and run.checkpoint_every == 0   # a checkpoint every epoch


def test_the_best_recipe_reaches_the_run(runs, pretrained, tiny_fashion, tmp_path):
    run = run_of(runs, ["quantize", "--recipe", "best", "--from", pretrained, "--data-dir",
                        tiny_fashion, "--out", str(tmp_path)])
    assert run.lagrangian.config.use_constraint is False and run.lagrangian.multipliers == {}
    assert run.distillation is None and run.meta["settings"]["recipe"] == "best"


def test_pretrain_flags_reach_the_run(runs, tiny_fashion, tmp_path):
    run = run_of(runs, ["pretrain", "--data-dir", tiny_fashion, "--out", str(tmp_path),
                        "--epochs", "4", "--lr", "0.05", "--momentum", "0.7", "--weight-decay",
                        "1e-3", "--batch-size", "8", "--limit", "32", "--seed", "2", "--quiet"])
    decay, no_decay = run.optimizer.param_groups
    assert (decay["lr"], decay["momentum"], decay["weight_decay"]) == (0.05, 0.7, 1e-3)
    assert no_decay["weight_decay"] == 0.0 and run.lagrangian is None
    assert run.scheduler.T_max == 4 and (run.epochs, run.batch_size, run.seed) == (4, 8, 2)
    assert len(run.train_data) == 32 and not cbp.quantized_layers(run.model)


def test_the_demo_config_reaches_the_runs(runs, pretrained, tiny_fashion, tmp_path):
    """cbp/configs/demo.toml, as the README describes it."""
    run = run_of(runs, ["pretrain", "--config", "demo", "--data-dir", tiny_fashion,
                        "--out", str(tmp_path / "fp")])
    decay, _ = run.optimizer.param_groups
    assert (decay["lr"], decay["weight_decay"], run.batch_size, run.epochs) == (0.1, 5e-4, 128, 3)
    run = run_of(runs, ["quantize", "--config", "demo", "--from", pretrained, "--data-dir",
                        tiny_fashion, "--out", str(tmp_path / "q")])
    config = run.lagrangian.config
    assert config.factors == (-1.0, 1.0)
    assert (config.multiplier_lr, config.p_max, config.stop_once_g_exceeds, config.lr_drop_at_g) == (
        2e-2, 2, 200, 100)
    decay, _ = run.optimizer.param_groups
    assert (decay["lr"], decay["weight_decay"]) == (1e-3, 1e-4)
    assert (run.batch_size, run.epoch_iters, run.epochs) == (128, 50, 60)
    assert len(run.val_data) == 128   # val_limit 1000 of the tiny set's 128
