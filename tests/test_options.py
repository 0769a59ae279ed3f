"""The command line and config files: one set of names and defaults, made from CBPConfig's fields
(issue 15 item 2), config files checked key by key, ``cbp.load_config`` (issue 14 item 6) and
the stopping rule's name (issue 14 item 7)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch.nn as nn

import cbp
from cbp.cli import commands as cli
from cbp.cli.options import cbp_config, cbp_fields, parse_args


def config_of(*argv: str) -> cbp.CBPConfig:
    return cbp_config(parse_args(["quantize", "--out", "o", *argv]))


def same_settings(a: cbp.CBPConfig, b: cbp.CBPConfig) -> bool:
    """Equal field by field (sequences compared as tuples: a flag gives a list)."""
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v
    return all(norm(getattr(a, f.name)) == norm(getattr(b, f.name))
               for f in dataclasses.fields(cbp.CBPConfig))


def test_every_field_but_levels_is_a_flag_with_the_field_default():
    names = {f.name for f in cbp_fields()}
    assert names == {f.name for f in dataclasses.fields(cbp.CBPConfig) if f.init} - {
        "levels", "filter_fn"}
    assert same_settings(config_of(), cbp.CBPConfig())


def test_each_flag_sets_its_field():
    config = config_of("--g-increments", "5:1,inf:5", "--p-max", "3", "--multiplier-rule", "plain",
                       "--no-use-constraint", "--no-skip-first-last", "--grad-clip-value", "none",
                       "--stop-once-g-exceeds", "200", "--compile-penalty", "--include", "a", "b")
    assert config.g_increments == ((5, 1), (math.inf, 5))
    assert [config.g_increment(g) for g in (1, 4, 5, 500)] == [1, 1, 5, 5]
    assert (config.p_max, config.multiplier_rule, config.use_constraint) == (3, "plain", False)
    assert (config.skip_first_last, config.grad_clip_value) == (False, None)
    assert (config.stop_once_g_exceeds, config.compile_penalty) == (200, True)
    assert list(config.include) == ["a", "b"]
    assert config_of("--no-compile-penalty").compile_penalty is False
    assert config_of().compile_penalty is None


def test_old_flag_spellings_still_work():
    old = config_of("--no-constraint", "--quantize-first-last", "--no-initial-update",
                    "--grad-clip", "0.5", "--g-final", "200")
    assert (old.use_constraint, old.skip_first_last, old.initial_multiplier_update) == (
        False, False, False)
    assert (old.grad_clip_value, old.stop_once_g_exceeds) == (0.5, 200)


def write(tmp_path, text: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_level_set_is_levels_and_its_old_name_constraint_still_works(tmp_path):
    assert config_of().levels == "binary"
    assert config_of("--levels", "ternary").levels == config_of("--constraint", "ternary").levels
    assert config_of("--levels", "-1,0,1").factors == (-1.0, 0.0, 1.0)
    assert config_of("--levels", "-1,0,1").factors == config_of(
        "--constraint", "custom", "--levels", "-1,0,1").factors
    new = write(tmp_path, '[quantize]\nlevels = "shift1"\n')
    old = write(tmp_path, '[quantize]\nconstraint = "shift1"\n', "old.toml")
    assert config_of("--config", new).levels == config_of("--config", old).levels == "shift1"
    assert config_of("--config", old, "--levels", "ternary").levels == "ternary"   # a flag wins
    custom = write(tmp_path, '[quantize]\nconstraint = "custom"\nlevels = "-1,1"\n', "custom.toml")
    assert config_of("--config", custom).factors == (-1.0, 1.0)
    assert config_of("--recipe", "best", "--config", old).levels == "shift1"
    assert cbp.load_config(old).cbp.levels == "shift1"
    args = parse_args(["quantize", "--out", "o", "--constraint", "ternary"])
    assert not hasattr(args, "constraint") and args._given == {"out", "levels"}


def test_the_transformer_recipe_is_ste_with_distillation_and_per_channel_scales():
    config = config_of("--recipe", "best-gpt")
    assert (config.use_constraint, config.scale) == (False, "per-channel")
    assert parse_args(["quantize", "--out", "o", "--recipe", "best-gpt"]).distill is True
    assert config_of("--recipe", "best-gpt", "--scale", "per-layer").scale == "per-layer"


def test_config_keys_old_and_new_set_the_same_fields(tmp_path):
    new = write(tmp_path, "[quantize]\nuse_constraint = false\nskip_first_last = false\n"
                          "grad_clip_value = 0.5\nstop_once_g_exceeds = 200\n"
                          "g_increments = '5:1,inf:5'\ncompile-penalty = false\n")
    old = tmp_path / "old.toml"
    old.write_text("[quantize]\nno_constraint = true\nquantize_first_last = true\n"
                   "grad_clip = 0.5\ng_final = 200\n")
    a, b = config_of("--config", new), config_of("--config", str(old))
    for config in (a, b):
        assert (config.use_constraint, config.skip_first_last) == (False, False)
        assert (config.grad_clip_value, config.stop_once_g_exceeds) == (0.5, 200)
    assert a.g_increments == ((5, 1), (math.inf, 5)) and a.compile_penalty is False
    # and the command line still wins over the file
    assert config_of("--config", new, "--use-constraint").use_constraint is True


@pytest.mark.parametrize("text, message", [
    ("p_max = 3\n[quantize]\nepochs = 2\n", "key(s) p_max outside the [quantize] table(s)"),
    ("[quantise]\np_max = 3\n", "unknown table [quantise]"),
    ("[pretrain]\nepochs = 3\n", "has no [quantize] table (it has [pretrain])"),
    ("[quantize]\np_maxx = 3\nepoch = 1\n", "unknown key(s) p_maxx, epoch for `cbp quantize`"),
    ("[quantize]\np_max = 'many'\n", "argument --p-max: invalid int value: 'many'"),
    ("[quantize]\nmultiplier_rule = 'sgd'\n", "argument --multiplier-rule: invalid choice: 'sgd'"),
    ("[quantize]\ng_increments = '10:1,100'\n", "argument --g-increments: expected BOUND:INC"),
    ("[quantize]\nchannels_last = 1\n", "channels_last must be true or false, got 1"),
    ("[quantize]\nlr = [1, 2]\n", "lr takes one value, not a list"),
    ("[quantize]\n[quantize.extra]\nx = 1\n", "unknown key(s) extra"),
    ("[quantize]\nconfig = 'demo'\n", "unknown key(s) config"),
    ("[quantize]\nrecipe = 'best'\n", "unknown key(s) recipe"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, capsys, text, message):
    """A wrong value reads as argparse words a wrong flag (exit 2 after the usage); anything else
    as every user mistake: one line, exit 2. Either way the line names the file, and nothing ran."""
    path = write(tmp_path, text)
    try:
        code = cli.main(["quantize", "--config", path, "--out", str(tmp_path / "out")])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"config {path}" in err[-1] and message in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


def test_flat_config_serves_every_command(tmp_path):
    path = write(tmp_path, "epochs = 4\nlr = 0.5\n")
    assert cbp.load_config(path).training["epochs"] == 4
    assert cbp.load_config(path, "pretrain").training["lr"] == 0.5


def test_load_config_gives_the_demo_settings_the_cli_runs_with():
    """Issue 14 item 6: the values of cbp/configs/demo.toml, and the CLI's defaults for the rest."""
    recipe = cbp.load_config("demo")
    assert same_settings(recipe.cbp, cbp.CBPConfig(
        levels="binary", multiplier_lr=2e-2, p_max=2, stop_once_g_exceeds=200, lr_drop_at_g=100))
    t = recipe.training
    assert (t["epoch_iters"], t["batch_size"], t["epochs"], t["val_limit"]) == (50, 128, 60, 1000)
    assert (t["lr"], t["weight_decay"], t["momentum"], t["seed"]) == (1e-3, 1e-4, 0.9, 0)
    assert t["data"] == "fashion-mnist" and "p_max" not in t and "out" not in t
    cli_args = parse_args(["quantize", "--config", "demo", "--out", "o"])
    assert same_settings(cbp_config(cli_args), recipe.cbp)
    assert all(getattr(cli_args, key) == value for key, value in t.items())

    pretrain = cbp.load_config("demo", "pretrain")
    assert pretrain.cbp is None
    assert (pretrain.training["model"], pretrain.training["epochs"], pretrain.training["lr"]) == (
        "resnet20", 3, 0.1)


def test_recipe_sets_the_method_and_config_and_flags_win(tmp_path):
    """Issue 23 item 4: ``--recipe best`` is cbp/configs/recipes/best.toml (STE-only, what the
    benchmarks found most accurate); a --config beside it wins over it, and flags over both. The
    paper's method stays the default."""
    args = parse_args(["quantize", "--recipe", "best", "--out", "o"])
    assert cbp_config(args).use_constraint is False
    assert cbp_config(parse_args(["quantize", "--config", "recipes/best", "--out", "o"])
                      ).use_constraint is False
    path = write(tmp_path, "[quantize]\nuse_constraint = true\np_max = 3\n")
    config = config_of("--recipe", "best", "--config", path)
    assert (config.use_constraint, config.p_max) == (True, 3)
    assert config_of("--recipe", "best", "--use-constraint").use_constraint is True
    plain = parse_args(["quantize", "--out", "o"])
    assert plain.distill is False and cbp_config(plain).use_constraint is True
    recipe = cbp.load_config("demo", recipe="best")
    assert recipe.cbp.use_constraint is False and recipe.cbp.p_max == 2   # demo's p_max
    assert "recipe" not in recipe.training
    assert cbp.load_config(None, recipe="best").cbp.use_constraint is False
    with pytest.raises(ValueError, match="recipe must be one of best"):
        cbp.load_config(None, recipe="worst")


def test_load_config_reads_a_paper_cell():
    recipe = cbp.load_config("paper/resnet50-binary")
    assert (recipe.cbp.factors, recipe.cbp.multiplier_lr, recipe.cbp.p_max) == ((-1.0, 1.0), 1e-4, 20)
    assert recipe.cbp.stop_once_g_exceeds is None   # the paper has no stopping rule
    assert (recipe.training["model"], recipe.training["batch_size"]) == ("resnet50", 128)
    with pytest.raises(ValueError, match="command must be one of pretrain, quantize"):
        cbp.load_config("demo", "evaluate")


def test_stop_once_g_exceeds_means_exceeds():
    """Issue 14 item 7: 200 with the paper's increments ends at g = 300, the first g above 200."""
    config = cbp.CBPConfig(p_max=1, stop_once_g_exceeds=200, multiplier_lr=0.0, lr_drop_at_g=None)
    model = cbp.prepare(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)), config)
    lagrangian = cbp.Lagrangian(model, config)
    gs = []
    while not lagrangian.finished:
        lagrangian.step()
        gs.append(lagrangian.end_epoch(1.0).g)
    assert gs[-3:] == [100, 200, 300]
    with pytest.raises(TypeError, match="g_final is now called stop_once_g_exceeds"):
        cbp.CBPConfig(g_final=200)


def test_a_new_multiplier_rule_is_one_entry(monkeypatch):
    """Issue 15 item 3: an entry in ASCENT_RULES reaches CBPConfig, the flag and the Lagrangian."""
    import torch

    from cbp.core.ascent import ASCENT_RULES

    monkeypatch.setitem(ASCENT_RULES, "adamw",
                        lambda params, lr: torch.optim.AdamW(params, lr=lr, maximize=True))
    config = config_of("--multiplier-rule", "adamw", "--multiplier-lr", "0.5", "--g-init", "inf")
    model = cbp.prepare(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)), config)
    lagrangian = cbp.Lagrangian(model, config)      # one update at initialisation
    ascent = lagrangian.state_dict()["ascent"]
    assert ascent["param_groups"][0]["weight_decay"] == 0.01   # AdamW's, not Adam's 0
    (lam,) = lagrangian.multipliers.values()
    assert lam.max() == pytest.approx(0.5, rel=1e-4)            # Adam-like first step: ~lr
