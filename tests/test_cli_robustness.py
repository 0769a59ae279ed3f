"""Issue 26: models and files cbp has never seen - a model without BatchNorm, tampered checkpoint
tensors and settings, two runs in one directory, foreign module trees, code for the old API.

Each case runs through the real CLI (``cbp.cli.commands.main``) or the library call a user would make.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import fails, first_scale, one_thread, pretrain_tiny_gpt

from cbp.cli import commands as cli
from cbp.cli.guards import lock_run_dir
from cbp.files.checkpoint import load_checkpoint, save_checkpoint
from cbp.training.plots import plot_run
from cbp.training.runs import CHECKPOINT_NAME, LOCK_NAME, LOG_NAME

pytestmark = pytest.mark.usefixtures("quiet_cli")   # one thread, no plots (conftest)


def flag_refused(capsys, argv: list[str], *needles: str) -> None:
    """argparse refuses a flag's value: exit 2, its error line names it, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    for needle in needles:
        assert needle in err.strip().splitlines()[-1], err


def tampered(src_dir: str, dst, change) -> str:
    """A copy of the run directory ``src_dir`` whose checkpoint ``change(state)`` edited."""
    shutil.copytree(src_dir, dst)
    path = os.path.join(dst, CHECKPOINT_NAME)
    state = load_checkpoint(path)
    change(state)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    return str(dst)


# ---- a model without BatchNorm: the GPT ----------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A GPT pretrained for two steps on generated text (a model without BatchNorm)."""
    root = tmp_path_factory.mktemp("gpt")
    _, common = pretrain_tiny_gpt(root, chars=20000, epochs=1, val_limit=2)
    return root, common


def test_recalibrate_bn_on_a_model_without_batchnorm_is_refused_before_training(gpt_run, capsys):
    root, common = gpt_run
    ckpt, out = str(root / "fp" / CHECKPOINT_NAME), root / "q"
    fails(capsys, ["quantize", "--from", ckpt, "--out", str(out), "--recalibrate-bn", "2",
                   *common], "--recalibrate-bn: the model has no BatchNorm layer")
    assert not (out / LOG_NAME).exists()   # refused before the first epoch, not after the last
    fails(capsys, ["evaluate", ckpt, "--data-dir", common[3], "--recalibrate-bn", "2"],
          "no BatchNorm layer", "drop --recalibrate-bn")


@pytest.mark.parametrize("value", ["nan", "1e-45", "0", "-1", "inf", "x"])
def test_generate_refuses_a_temperature_it_cannot_sample_with(gpt_run, capsys, value):
    root, _ = gpt_run
    flag_refused(capsys, ["generate", str(root / "fp" / CHECKPOINT_NAME), "--tokens", "3",
                          "--temperature", value], "--temperature")


def test_generate_samples_at_the_lowest_temperature_it_accepts(gpt_run, capsys):
    root, _ = gpt_run
    capsys.readouterr()
    assert cli.main(["generate", str(root / "fp" / CHECKPOINT_NAME), "--prompt", "O",
                     "--tokens", "5", "--temperature", "0.001"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n")) == 6


def test_generate_takes_a_context_shift_within_the_models_context(gpt_run, capsys):
    root, _ = gpt_run
    ckpt = str(root / "fp" / CHECKPOINT_NAME)
    flag_refused(capsys, ["generate", ckpt, "--context-shift", "0"], "--context-shift")
    fails(capsys, ["generate", ckpt, "--context-shift", "129"],
          "context shift must be between 1 and the model's context, 128; got 129")
    texts = []
    for shift in ("1", "64"):   # 140 characters: past the context of 128
        capsys.readouterr()
        assert cli.main(["generate", ckpt, "--prompt", "O", "--tokens", "140",
                         "--context-shift", shift]) == 0
        texts.append(capsys.readouterr().out[:-1])   # print ends it with one newline
    assert [len(t) for t in texts] == [141, 141] and texts[0][:129] == texts[1][:129]


@pytest.mark.parametrize("change, field", [
    (lambda s: s["meta"].update(vocab=s["meta"]["vocab"][:-1]), "meta.vocab"),   # one token short
    (lambda s: s["meta"].update(vocab=list(s["meta"]["vocab"])), "meta.vocab"),
    (lambda s: s["meta"].update(task="poetry"), "meta.task"),
    (lambda s: s["meta"].update(task="classification"), "meta.task"),
])
def test_generate_refuses_a_crafted_vocabulary_or_task(gpt_run, tmp_path, capsys, change, field):
    root, _ = gpt_run
    run = tampered(str(root / "fp"), tmp_path / "run", change)
    fails(capsys, ["generate", os.path.join(run, CHECKPOINT_NAME), "--tokens", "3"],
          f": {field} must be")


# ---- checkpoint tensors and settings -------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, 0.0, -0.5, math.inf])
def test_a_tampered_layer_scale_is_refused_naming_the_tensor(reference_run, tmp_path, capsys,
                                                             value):
    key = []

    def change(state):
        key.append(first_scale(state))
        state["model"][key[0]] = torch.tensor(value)
    run = tampered(reference_run, tmp_path / "run", change)
    for argv in (["evaluate", os.path.join(run, CHECKPOINT_NAME)],
                 ["export", os.path.join(run, CHECKPOINT_NAME), str(tmp_path / "m.safetensors")]):
        fails(capsys, argv, f"model.{key[0]} must be positive and finite")
    assert not (tmp_path / "m.safetensors").exists()


def test_tampered_factors_and_a_scale_of_the_wrong_shape_are_refused(reference_run, tmp_path,
                                                                     capsys):
    def factors(state):
        key = next(k for k in state["model"] if k.endswith(".cbp_factors"))
        state["model"][key] = torch.tensor([-2.0, 2.0])
    run = tampered(reference_run, tmp_path / "a", factors)
    fails(capsys, ["evaluate", os.path.join(run, CHECKPOINT_NAME)],
          ".cbp_factors must be the run's levels (meta.factors: [-1.0, 1.0])")

    def shape(state):
        state["model"][first_scale(state)] = torch.ones(3)
    run = tampered(reference_run, tmp_path / "b", shape)
    fails(capsys, ["evaluate", os.path.join(run, CHECKPOINT_NAME)], "one per output channel")


@pytest.mark.parametrize("key, value", [
    ("epoch_iters", 0), ("seed", 1e30), ("workers", -1), ("batch_size", "32"),
    ("levels", "quinary"), ("use_constraint", 1), ("lr", math.nan),
])
def test_recorded_settings_are_range_checked_on_resume(reference_run, quantize_argv, tmp_path,
                                                       capsys, key, value):
    run = tampered(reference_run, tmp_path / "run",
                   lambda state: state["meta"]["settings"].update({key: value}))
    flag = "--" + key.replace("_", "-")
    # --levels takes any text (a level set or factors); CBPConfig's check is its range check
    needle = ("--levels must be one of binary, ternary, shift1, shift2 or comma-separated numbers, "
              "got 'quinary'" if key == "levels" else
              f"settings.{key} ({flag}) is {value!r}, which {flag} does not accept")
    fails(capsys, ["quantize", "--out", run, "--resume", "--quiet"], needle)


def test_config_file_values_count_as_given_on_resume(reference_run, tmp_path, capsys):
    run = shutil.copytree(reference_run, tmp_path / "run")
    config = tmp_path / "c.toml"
    config.write_text("[quantize]\nlr = 0.5\np_max = 1\n")   # p_max: the run's own value
    fails(capsys, ["quantize", "--out", str(run), "--resume", "--config", str(config)],
          "--lr 0.5 (the run's: 0.001)")


def test_a_checkpoint_that_names_its_level_set_constraint_resumes(reference_run, quantize_argv,
                                                                 tmp_path, capsys):
    """Checkpoints from before ``levels`` was the level set's name everywhere: ``meta`` and the
    recorded settings said ``constraint`` (``--constraint binary``, ``--levels`` unset)."""
    run = str(shutil.copytree(reference_run, tmp_path / "run"))
    path = os.path.join(run, CHECKPOINT_NAME)
    state = load_checkpoint(path)
    state["meta"]["constraint"] = state["meta"].pop("levels")
    state["meta"]["settings"].update(constraint=state["meta"]["settings"].pop("levels"), levels=None)
    save_checkpoint(state, path)
    fails(capsys, quantize_argv(run, 3, "--resume", "--levels", "ternary"),
          "--levels 'ternary' (the run's: 'binary')")
    with one_thread():
        assert cli.main(quantize_argv(run, 3, "--resume", "--constraint", "binary")) == 0
    assert load_checkpoint(path)["epoch"] == 3 and load_checkpoint(path)["meta"]["levels"] == "binary"


def test_overwrite_refuses_to_replace_the_checkpoint_it_quantizes(pretrained, tiny_fashion,
                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    source = out / CHECKPOINT_NAME
    shutil.copy(pretrained, source)
    before = source.read_bytes()
    fails(capsys, ["quantize", "--from", str(source), "--data-dir", tiny_fashion, "--out",
                   str(out), "--overwrite"], f"--from {source} is a file of --out")
    assert source.read_bytes() == before


# ---- the run directory ---------------------------------------------------------------------------


def test_a_new_run_never_replaces_a_users_oscillations_png(quantize_argv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "oscillations.png").write_bytes(b"mine")
    fails(capsys, quantize_argv(str(out), 1), "already holds oscillations.png")
    assert (out / "oscillations.png").read_bytes() == b"mine"


def test_a_live_run_locks_its_directory_and_a_killed_ones_lock_is_taken_over(
        reference_run, quantize_argv, tmp_path, capsys):
    run = str(shutil.copytree(reference_run, tmp_path / "run"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cbp.cli.guards import lock_run_dir\n"
         f"with lock_run_dir({run!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(capsys, ["quantize", "--out", run, "--resume", "--quiet"],
              f"{run} is being written by another cbp run (pid {holder.pid})")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with open(os.path.join(run, LOCK_NAME)) as f:
        assert f.read().strip() == str(holder.pid)   # the killed run's lock file is still there
    with lock_run_dir(run):   # and taken over
        with open(os.path.join(run, LOCK_NAME)) as f:
            assert f.read().strip() == str(os.getpid())
    assert not os.path.exists(os.path.join(run, LOCK_NAME))   # removed by the run that ends


# ---- other command-line mistakes -----------------------------------------------------------------

def test_unknown_device_and_huge_seed_are_refused_naming_them(tiny_fashion, tmp_path, capsys):
    fails(capsys, ["pretrain", "--data-dir", tiny_fashion, "--out", str(tmp_path / "a"),
                   "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'")
    flag_refused(capsys, ["pretrain", "--data-dir", tiny_fashion, "--out", str(tmp_path / "b"),
                          "--seed", str(2**64)], "--seed", "below 2**63")


def test_a_checkpoint_that_does_not_fit_says_why(pretrained, tmp_path, capsys):
    run = tampered(os.path.dirname(pretrained), tmp_path / "run",
                   lambda state: state["model"].pop("fc.bias"))
    fails(capsys, ["evaluate", os.path.join(run, CHECKPOINT_NAME)],
          'does not fit its model: Error(s) in loading state_dict for ResNet20: Missing key(s) '
          'in state_dict: "fc.bias"')


def test_plot_of_a_log_row_without_epoch_or_figure_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "plot_run", plot_run)   # quiet_cli's stand-in draws nothing
    log = tmp_path / LOG_NAME
    log.write_text('{"epoch": 1, "top1": 50.0}\n{"top1": 60.0}\n')
    fails(capsys, ["plot", str(tmp_path)], f"{log}, line 2: not a JSON object with an integer "
          "'epoch'")
    log.write_text('{"epoch": 1, "top1": 50.0}\n{"epoch": 2}\n')
    fails(capsys, ["plot", str(tmp_path)], f"{log}: a row lacks 'top1'")


# ---- the library ---------------------------------------------------------------------------------


