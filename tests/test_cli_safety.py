"""Issue 16 (never lose a user's file, never accept a value that silently breaks training) and
issue 14 item 9 (``--resume`` with changed settings). One test (or parametrized group) per item,
each through ``cbp.cli.commands.main`` where a user would meet it, on the tiny Fashion-MNIST of conftest."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
import torch
import torch.nn as nn
from conftest import REFERENCE_EPOCHS, STEPS, FullDisk, Payload, after_step, fails, image_folders, set_field

import cbp
import cbp.cli.commands
import cbp.cli.training
import cbp.training.runs
from cbp.cli import commands as cli
from cbp.files.checkpoint import (
    TMP_SUFFIX,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from cbp.files.export_read import read_packed
from cbp.training.run_state import check_run_state
from cbp.training.runs import CHECKPOINT_NAME, HIST_NAME, LOG_NAME, read_jsonl

pytestmark = pytest.mark.usefixtures("quiet_cli")   # one thread, no plots (conftest)


def snapshot(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


# ---- 1: files the user did not ask us to replace -------------------------------------------------

@pytest.mark.parametrize("name", [LOG_NAME, HIST_NAME, "curves.png"])
def test_a_new_run_never_replaces_a_file_it_did_not_write(quantize_argv, tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("the user's own notes\n")
    fails(capsys, quantize_argv(str(out), 1), f"already holds {name}", "--overwrite")
    assert snapshot(out) == {name: b"the user's own notes\n"}
    assert cli.main(quantize_argv(str(out), 1, "--overwrite")) == 0   # asked for: replaced
    assert (out / CHECKPOINT_NAME).exists()


def test_only_our_own_temporaries_are_removed(quantize_argv, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    theirs = {".tmp-draft": b"mine", ".tmp-x.cbp-tmp": b"mine too", "notes.txt": b"mine"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    ours = out / f".{CHECKPOINT_NAME}.k3j2{TMP_SUFFIX}"   # a write killed half-way
    ours.write_bytes(b"half a checkpoint")
    assert cli.main(quantize_argv(str(out), 1)) == 0
    files = snapshot(out)
    assert not ours.exists() and all(files[n] == data for n, data in theirs.items())
    remove_stale_temporaries(str(out), (CHECKPOINT_NAME,))
    assert set(theirs) <= set(os.listdir(out))


# ---- 2: export never replaces the run (or any file it did not write) -----------------------------

def test_export_refuses_to_replace_a_checkpoint_or_a_users_file(reference_run, tmp_path, capsys):
    ckpt = os.path.join(reference_run, CHECKPOINT_NAME)
    before = open(ckpt, "rb").read()
    fails(capsys, ["export", ckpt, ckpt], f"refusing to replace {ckpt}", "not a cbp export")
    assert open(ckpt, "rb").read() == before and load_checkpoint(ckpt)["epoch"] == REFERENCE_EPOCHS
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not an export")
    fails(capsys, ["export", ckpt, str(notes)], "refusing to replace")
    assert notes.read_text() == "not an export"
    packed = str(tmp_path / "m.safetensors")
    assert cli.main(["export", ckpt, packed]) == 0
    assert cli.main(["export", ckpt, packed]) == 0          # an earlier export: replaced
    assert read_packed(packed)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    fails(capsys, ["export", ckpt, packed, "--onnx", ckpt], "not an ONNX model")
    assert open(ckpt, "rb").read() == before


# ---- 3: values that would silently break training ------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--grad-clip", "-1"], "--grad-clip-value must be a number > 0"),
    (["--weight-clamp", "-1"], "--weight-clamp must be a number > 0"),
    (["--lr-drop-factor", "-0.1"], "--lr-drop-factor must be a number > 0 and <= 1"),
    (["--lr-drop-factor", "nan"], "--lr-drop-factor must be"),
    (["--multiplier-lr", "nan"], "--multiplier-lr must be a finite number >= 0"),
    (["--p-max", "0"], "--p-max must be an integer >= 1"),
    (["--g-init", "nan"], "--g-init must be"),
    (["--g-final", "0.5"], "--stop-once-g-exceeds must be a number >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be"),
    (["--momentum", "1.5"], "--momentum must be a number >= 0 and < 1"),
    (["--weight-decay", "-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--constraint", "custom", "--levels", "-1e-50,1e-50"], "collapse or overflow in float32"),
    (["--constraint", "custom", "--levels", "-1e39,1e39"], "collapse or overflow in float32"),
])
def test_bad_numbers_are_refused_naming_the_flag(quantize_argv, tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    fails(capsys, quantize_argv(str(out), 1, *flags), needle)
    assert not (out / CHECKPOINT_NAME).exists()


def test_pretrain_checks_its_numbers_too(tiny_fashion, tmp_path, capsys):
    fails(capsys, ["pretrain", "--data-dir", tiny_fashion, "--lr", "inf", "--out",
                   str(tmp_path / "run")], "--lr must be a finite number > 0, got inf")


# ---- 4: a pruned (all-zero) layer ----------------------------------------------------------------

def test_an_all_zero_layer_is_refused_at_prepare_naming_it(pretrained, tiny_fashion, tmp_path,
                                                          capsys):
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[2].weight.zero_()
    with pytest.raises(ValueError, match="layer '2' has all-zero weights"):
        cbp.prepare(net)
    assert not cbp.quantized_layers(net)               # nothing half-prepared
    assert cbp.quantized_layers(cbp.prepare(net, cbp.CBPConfig(exclude=["^2$"])))  # the way out

    state = load_checkpoint(pretrained)
    state["model"]["layer2.0.conv1.weight"].zero_()    # a pruned layer
    pruned = str(tmp_path / "pruned.pt")
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, pruned)
    out = tmp_path / "run"
    fails(capsys, ["quantize", "--from", pruned, "--data-dir", tiny_fashion, "--limit", "64",
                   "--batch-size", "32", "--epochs", "1", "--out", str(out), "--quiet"],
          "layer 'layer2.0.conv1' has all-zero weights", "--exclude")
    assert not (out / LOG_NAME).exists()               # refused before any training


# ---- 5: image folders whose train/ and val/ classes differ ----------------------------------------

def pretrain_folder(data: str, out) -> list[str]:
    return ["pretrain", "--data", "imagefolder", "--data-dir", data, "--image-size", "16",
            "--batch-size", "2", "--epochs", "1", "--out", str(out), "--quiet"]


@pytest.mark.parametrize("val, needle", [
    (["cat", "dog", "emu"], "lacks ant; has emu besides"),   # same count, other names
    (["ant", "cat"], "lacks dog"),                            # a class short: IndexError before
])
def test_train_and_val_classes_must_match_before_training(tmp_path, capsys, val, needle):
    data = image_folders(tmp_path / "data", ["ant", "cat", "dog"], val)
    out = tmp_path / "run"
    fails(capsys, pretrain_folder(data, out), "val does not hold the same classes", needle)
    assert not (out / LOG_NAME).exists()


def test_evaluate_checks_the_checkpoints_classes(tmp_path, capsys):
    data = image_folders(tmp_path / "data", ["ant", "cat", "dog"], ["ant", "cat", "dog"])
    assert cli.main(pretrain_folder(data, tmp_path / "run")) == 0
    other = image_folders(tmp_path / "other", ["ant", "cat", "dog"], ["ant", "bee", "cat"])
    fails(capsys, ["evaluate", str(tmp_path / "run" / CHECKPOINT_NAME), "--data-dir", other,
                   "--image-size", "16"], "lacks dog; has bee besides")


# ---- 6: a bare layer as prepare's root -----------------------------------------------------------


# ---- 9: a checkpoint whose format is valid but whose contents are not ----------------------------

def bad_copy(reference_run, folder, field: str, value) -> str:
    """The reference run's checkpoint with one field changed (``KeyError``: removed)."""
    state = load_checkpoint(os.path.join(reference_run, CHECKPOINT_NAME))
    del state["format"]
    set_field(state, field, value)
    path = str(folder / CHECKPOINT_NAME)
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("field, value, needle", [
    ("meta.num_classes", KeyError, "meta.num_classes must be an integer from 1 to 100,000, got "
                                   "nothing (missing)"),
    ("meta.num_classes", 2_000_000_000, "meta.num_classes must be"),
    ("meta.input_size", [1, 100_000, 100_000], "meta.input_size must be"),
    ("meta.in_channels", "1", "meta.in_channels must be"),
    ("meta.model", "vgg", "meta.model must be one of"),
    ("meta.model_options", {"transform_input": [1]}, "meta.model_options must be a table of"),
    ("meta.factors", [1.0, -1.0], "meta.factors: level factors must be strictly increasing"),
    ("epoch", "1", "epoch must be an integer >= 0"),
    ("model", [1, 2], "model must be a table of tensors"),
    ("meta", KeyError, "meta must be a table"),
])
def test_a_checkpoint_with_bad_contents_is_one_line_naming_the_field(
        reference_run, tmp_path, capsys, monkeypatch, field, value, needle):
    path = bad_copy(reference_run, tmp_path / "run", field, value)
    monkeypatch.setattr(cbp.training.runs, "rebuild_model", lambda *a, **k: pytest.fail("model built"))
    for argv in (["evaluate", path], ["export", path, str(tmp_path / "m.safetensors")],
                 ["summary", path]):
        fails(capsys, argv, f"checkpoint {path}: {needle}")


@pytest.mark.parametrize("field, value, needle", [
    ("rng", torch.zeros(7, dtype=torch.uint8), "rng must be a uint8 tensor of"),
    ("step", -1, "step must be an integer >= 0"),
    ("optimizer", {"state": {}}, "optimizer must be an optimizer state_dict"),
    ("cbp.g", "big", "cbp.g must be a number >= 1"),
    ("cbp.p", -1, "cbp.p must be an integer >= 0"),
    ("cbp", None, "cbp must be the CBP state (a table), got None"),
    ("meta.num_classes", 2_000_000_000, "meta.num_classes must be"),
])
def test_resume_checks_every_field_it_reads_before_loading_data(
        quantize_argv, reference_run, tmp_path, capsys, monkeypatch, field, value, needle):
    out = tmp_path / "run"
    path = bad_copy(reference_run, out, field, value)
    monkeypatch.setattr(cbp.cli.training, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    fails(capsys, quantize_argv(str(out), 3, "--resume"), f"checkpoint {path}: {needle}")
    assert check_run_state(load_checkpoint(os.path.join(reference_run, CHECKPOINT_NAME)), "x")


# ---- 10: --resume without a checkpoint, with --overwrite, mid-epoch with another data order -----

def test_resume_without_a_checkpoint_says_so(quantize_argv, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(quantize_argv(str(out), 1, "--resume")) == 0
    assert "holds no checkpoint.pt to resume: starting a new run there" in capsys.readouterr().err
    (out / CHECKPOINT_NAME).unlink()                  # a log, no checkpoint: whose log is it?
    fails(capsys, quantize_argv(str(out), 1, "--resume"), f"holds {LOG_NAME}",
          "but no checkpoint.pt to continue from")


def test_resume_and_overwrite_together_are_refused(quantize_argv, reference_run, capsys):
    before = snapshot(reference_run)
    fails(capsys, quantize_argv(reference_run, 2, "--resume", "--overwrite"),
          "--resume continues the run in --out and --overwrite replaces it")
    assert snapshot(reference_run) == before


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "16"], "--batch-size 16 (the run's: 32)"),
    (["--seed", "1"], "--seed 1 (the run's: 0)"),
    (["--limit", "128"], "--limit 128 (the run's: 96)"),
])
def test_a_mid_epoch_resume_with_another_data_order_is_refused(
        quantize_argv, tmp_path, monkeypatch, capsys, flags, needle):
    out = str(tmp_path / "run")
    after_step(monkeypatch, STEPS + 1, lambda _: os.kill(os.getpid(), signal.SIGINT))
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS)) == 130
    monkeypatch.undo()
    monkeypatch.setattr(cbp.cli.training, "plot_run", lambda run_dir: [])
    before = snapshot(out)
    fails(capsys, quantize_argv(out, REFERENCE_EPOCHS, "--resume", *flags), needle)
    assert snapshot(out) == before


# ---- 11: a torn last line in the logs ------------------------------------------------------------

def test_a_torn_last_log_line_blocks_neither_resume_nor_plot(
        quantize_argv, reference_run, assert_same_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    assert cli.main(quantize_argv(out, 1)) == 0
    for name in (LOG_NAME, HIST_NAME):            # a crash in the middle of an append
        with open(os.path.join(out, name), "a") as f:
            f.write('{"epoch": 2, "loss": 0.12')
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, LOG_NAME))] == [1]
    monkeypatch.undo()
    assert cli.main(["plot", out]) == 0
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    monkeypatch.setattr(cbp.cli.training, "plot_run", lambda run_dir: [])
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)
    with open(os.path.join(out, LOG_NAME), "a") as f:   # damage elsewhere is an error
        f.write("garbage\n{}\n")
    monkeypatch.undo()
    fails(capsys, ["plot", out], f"{LOG_NAME}, line 3: not a JSON object")


# ---- 12: a full disk when the checkpoint is written ----------------------------------------------

def test_a_full_disk_at_checkpoint_time_is_one_line_naming_the_file(
        quantize_argv, reference_run, assert_same_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    fdopen, full = os.fdopen, []

    def fdopen_on_a_full_disk_once_full(fd, *args, **kwargs):
        file = fdopen(fd, *args, **kwargs)
        return FullDisk(file) if full else file
    monkeypatch.setattr(os, "fdopen", fdopen_on_a_full_disk_once_full)
    after_step(monkeypatch, STEPS + 1, lambda _: full.append(True))   # epoch 2 on a full disk
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    fails(capsys, quantize_argv(out, REFERENCE_EPOCHS),
          f"cannot write {ckpt}: No space left on device; the previous file is untouched")
    monkeypatch.undo()
    monkeypatch.setattr(cbp.cli.training, "plot_run", lambda run_dir: [])
    assert load_checkpoint(ckpt)["epoch"] == 1                      # epoch 1's, whole
    assert sorted(os.listdir(out)) == [CHECKPOINT_NAME, HIST_NAME, LOG_NAME]   # no temporary
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)


# ---- 13: the refusal of an unsafe pickle gives no advice to load it unsafely ---------------------

def test_unsafe_pickles_are_refused_without_pytorchs_advice(tiny_fashion, tmp_path, capsys):
    evil = str(tmp_path / "evil.pt")
    torch.save({"format": "cbp-checkpoint-v1", "model": Payload(str(tmp_path / "never"))}, evil)
    for argv in (["evaluate", evil], ["pretrain", "--data-dir", tiny_fashion, "--weights", evil,
                                      "--out", str(tmp_path / "run")]):
        err = fails(capsys, argv, "it would call exec when unpickled",
                    "cbp never runs code from a file")
        assert "weights_only" not in err and "trust" not in err
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):   # what it would say
        torch.load(evil, weights_only=True)


# ---- issue 14, item 9: --resume with changed settings --------------------------------------------

def test_resume_refuses_changed_settings_naming_every_flag(reference_run, quantize_argv, capsys):
    before = snapshot(reference_run)
    fails(capsys, quantize_argv(reference_run, 3, "--resume", "--lr", "0.01", "--p-max", "5",
                                "--multiplier-lr", "1e-4"),
          "--lr 0.01 (the run's: 0.001)", "--multiplier-lr 0.0001 (the run's: 0.01)",
          "--p-max 5 (the run's: 1)", "drop them, or start a new run")
    assert snapshot(reference_run) == before


def test_checkpoint_every_changes_when_checkpoints_are_written_not_the_run(
        quantize_argv, reference_run, assert_same_run, tmp_path):
    """A run writing its epoch ends at most hourly (the last one all the same), resumed with a
    checkpoint every epoch (a setting a resume may change): the reference run, step for step."""
    out = str(tmp_path / "run")
    assert cli.main(quantize_argv(out, 1, "--checkpoint-every", "3600")) == 0
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume", "--checkpoint-every", "0")) == 0
    assert_same_run(out, reference_run)


def test_resume_takes_the_runs_settings_and_reports_a_longer_run(
        quantize_argv, reference_run, assert_same_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(quantize_argv(out, 1)) == 0
    capsys.readouterr()
    # nothing but where the run is and how long it should now run: every setting from the run
    # (the device is the machine's, not the run's: on a machine with a GPU it would be CUDA)
    assert cli.main(["quantize", "--out", out, "--resume", "--epochs", str(REFERENCE_EPOCHS),
                     "--device", "cpu"]) == 0
    assert f"with --epochs {REFERENCE_EPOCHS} (it ran with 1)" in capsys.readouterr().err
    assert_same_run(out, reference_run)
