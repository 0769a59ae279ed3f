"""Issue 8: interrupted runs resume exactly, NaN stops cleanly, bad input is one line, unsafe
files are refused. Everything goes through ``cbp.cli.commands.main`` on a tiny Fashion-MNIST; the kills
that need a real process (SIGKILL, a real Ctrl-C) run one."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE_EPOCHS, STEPS, Payload, after_step, fails, image_folders, one_thread, spawn

import cbp.cli.commands
import cbp.training.train
import cbp.zoo.tasks
from cbp.cli import commands as cli
from cbp.core.lagrangian import Lagrangian
from cbp.files.checkpoint import (
    CheckpointError,
    load_checkpoint,
)
from cbp.files.export import ExportError
from cbp.files.export_read import read_packed
from cbp.training.runs import CHECKPOINT_NAME, HIST_NAME, LOG_NAME, read_jsonl

pytestmark = pytest.mark.usefixtures("quiet_cli")   # one thread, no plots (conftest)


def last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def checkpoint(run_dir) -> dict:
    return load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))


# ---- signals, in process: deterministic points -------------------------------------------------

def test_sigint_mid_epoch_writes_that_step_and_resumes_exactly(
        quantize_argv, reference_run, assert_same_run, tmp_path, monkeypatch, capsys,
        signals_raise):
    out = str(tmp_path / "run")
    after_step(monkeypatch, STEPS + 1, lambda _: os.kill(os.getpid(), signal.SIGINT))
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS)) == 130
    assert last_line(capsys).startswith(f"cbp: stopped by SIGINT in epoch 2 after step 1 of "
                                        f"{STEPS};")
    state = checkpoint(out)
    assert (state["epoch"], state["step"]) == (1, 1)
    assert state["cbp"]["penalty_sum"] > 0 and state["loss_sum"] > 0   # the epoch so far
    assert len(read_jsonl(os.path.join(out, LOG_NAME))) == 1
    monkeypatch.undo()
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)


def test_sigterm_during_the_epoch_end_stops_after_it(
        quantize_argv, reference_run, assert_same_run, tmp_path, monkeypatch, capsys,
        signals_raise):
    out = str(tmp_path / "run")
    evaluate = cbp.zoo.tasks.Classification.evaluate

    def evaluate_then_term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(cbp.zoo.tasks.Classification, "evaluate", staticmethod(evaluate_then_term))
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS)) == 143
    assert last_line(capsys).startswith("cbp: stopped by SIGTERM after epoch 1;")
    assert (checkpoint(out)["epoch"], checkpoint(out)["step"]) == (1, 0)
    monkeypatch.undo()
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)


def test_a_second_ctrl_c_aborts_at_once(quantize_argv, tmp_path, monkeypatch, capsys):
    """The first SIGINT asks for a checkpoint after the step; a second one, before that step
    ends, aborts there: no new checkpoint, the last whole one stays."""
    out = str(tmp_path / "run")

    def twice(_):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    after_step(monkeypatch, STEPS + 1, twice)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's Ctrl-C
    try:
        assert cli.main(quantize_argv(out, REFERENCE_EPOCHS)) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "cbp: interrupted"
    assert (checkpoint(out)["epoch"], checkpoint(out)["step"]) == (1, 0)
    assert len(read_jsonl(os.path.join(out, LOG_NAME))) == 1


class Crash(Exception):
    """Stands for the process dying: raised where a real crash could happen."""


def test_log_rows_after_the_checkpoint_are_dropped_on_resume(
        quantize_argv, reference_run, assert_same_run, tmp_path, monkeypatch):
    """A crash after epoch 2's log and histogram rows but before its checkpoint: the resumed run
    redoes epoch 2 and its rows appear once."""
    out = str(tmp_path / "run")
    save, calls = cbp.training.train.save_checkpoint, []

    def crash_at_the_second(state, path):
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise Crash
        save(state, path)
    monkeypatch.setattr(cbp.training.train, "save_checkpoint", crash_at_the_second)
    with pytest.raises(Crash):
        cli.main(quantize_argv(out, REFERENCE_EPOCHS))
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, LOG_NAME))] == [1, 2]
    assert checkpoint(out)["epoch"] == 1
    monkeypatch.setattr(cbp.training.train, "save_checkpoint", save)
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)
    assert [h["epoch"] for h in read_jsonl(os.path.join(out, HIST_NAME))] == [0, 1, 2]


# ---- signals, in a real process ----------------------------------------------------------------

# Runs the CLI and prints a line after every CBP step, so the test knows where the run is; after
# step PAUSE_AT it waits for a line on stdin, so that a signal sent then lands at that point
# however slowly the test itself runs.
CHILD = f"""
import sys
from cbp.cli import commands as cli
from cbp.core import lagrangian
step, count = lagrangian.Lagrangian.step, [0]
def printing(self):
    step(self)
    count[0] += 1
    print("step", flush=True)
    if count[0] == {STEPS + 1}:
        sys.stdin.readline()
lagrangian.Lagrangian.step = printing
sys.exit(cli.main(sys.argv[1:]))
"""


def read_lines(proc: subprocess.Popen, count: int) -> list[str]:
    lines = [proc.stdout.readline() for _ in range(count)]
    assert all(lines), f"the child ended early: {proc.communicate()[1]}"
    return lines


def test_sigkill_mid_epoch_keeps_the_checkpoint_and_resumes_exactly(
        quantize_argv, reference_run, assert_same_run, tmp_path):
    out = str(tmp_path / "run")
    proc = spawn(CHILD, *quantize_argv(out, REFERENCE_EPOCHS))
    read_lines(proc, STEPS + 1)            # epoch 1 done and saved, paused in epoch 2
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (checkpoint(out)["epoch"], checkpoint(out)["step"]) == (1, 0)
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "histograms.jsonl", "log.jsonl"]


def test_ctrl_c_in_a_real_process(quantize_argv, reference_run, assert_same_run, tmp_path):
    out = str(tmp_path / "run")
    proc = spawn(CHILD, *quantize_argv(out, REFERENCE_EPOCHS))
    read_lines(proc, STEPS + 1)            # paused after epoch 2's first step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate("go on\n")
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"cbp: stopped by SIGINT in epoch 2 after step 1 of {STEPS};")
    assert (checkpoint(out)["epoch"], checkpoint(out)["step"]) == (1, 1)
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)


# Writes a checkpoint whole, then SIGKILLs itself half-way through writing the next one: the
# kill lands inside the write every time. "naive" swaps in a writer that writes in place, the
# kind this test exists to catch.


# ---- NaN / inf ---------------------------------------------------------------------------------

def poison(lagrangian: Lagrangian) -> None:
    """Every trained parameter NaN. (A NaN in a quantized weight alone need not show in the loss:
    its forward uses the nearest level; the check of the weights at each epoch's end finds it.)"""
    for p in lagrangian.parameters:
        p.data.fill_(math.nan)


def test_nan_loss_stops_naming_epoch_and_step(quantize_argv, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    saved = {}

    def poison_and_remember(lagrangian):
        saved["bytes"] = open(os.path.join(out, CHECKPOINT_NAME), "rb").read()
        poison(lagrangian)
    after_step(monkeypatch, STEPS + 1, poison_and_remember)   # epoch 2, step 1
    fails(capsys, quantize_argv(out, REFERENCE_EPOCHS),
          "the loss became nan in epoch 2 at step 2;", "checkpoint", "is untouched")
    assert open(os.path.join(out, CHECKPOINT_NAME), "rb").read() == saved["bytes"]
    assert len(read_jsonl(os.path.join(out, LOG_NAME))) == 1


def test_nan_weights_at_an_epoch_end_are_never_saved(quantize_argv, tmp_path, monkeypatch,
                                                     capsys):
    out = str(tmp_path / "run")
    after_step(monkeypatch, STEPS, poison)             # the last step of epoch 1
    fails(capsys, quantize_argv(out, REFERENCE_EPOCHS),
          "the weights became NaN or infinite in epoch 1", "no checkpoint was written")
    assert not os.path.exists(os.path.join(out, CHECKPOINT_NAME))


def test_on_nan_lower_lr_goes_back_and_continues(quantize_argv, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    after_step(monkeypatch, 1, poison)      # before any checkpoint: back to the start
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--on-nan", "lower-lr")) == 0
    assert "going back to epoch 0, step 0 with the learning rate times 0.1" in (
        capsys.readouterr().err)
    rows = read_jsonl(os.path.join(out, LOG_NAME))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["lr"] == pytest.approx(1e-4) and math.isfinite(r["loss"]) for r in rows)
    assert all(t.isfinite().all() for t in checkpoint(out)["model"].values())


def test_on_nan_lower_lr_gives_up_after_three_retries(quantize_argv, tmp_path, monkeypatch,
                                                     capsys):
    out = str(tmp_path / "run")
    step = Lagrangian.step

    def always_poison(self):
        step(self)
        poison(self)
    monkeypatch.setattr(Lagrangian, "step", always_poison)
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--on-nan", "lower-lr")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    retries = [line for line in lines if "going back" in line]
    assert [line.split("times ")[-1] for line in retries] == ["0.1", "0.01", "0.001"]
    assert len(lines) == 4 and lines[-1] == (
        "cbp: error: the loss became nan in epoch 1 at step 2; no checkpoint was written")
    assert not os.path.exists(os.path.join(out, CHECKPOINT_NAME))


# ---- bad input: one line, exit 2 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tiny_fashion, pretrained, reference_run, tmp_path_factory):
    """Bad files of every kind, next to the good ones."""
    tmp = tmp_path_factory.mktemp("bad")
    ref = os.path.join(reference_run, CHECKPOINT_NAME)
    data = open(ref, "rb").read()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    middle = len(data) // 2
    (tmp / "flipped.pt").write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    (tmp / "empty").mkdir()
    truncated_idx = tmp / "truncated_idx"
    shutil.copytree(tiny_fashion, truncated_idx)
    images = truncated_idx / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    bad_gzip = tmp / "bad_gzip"
    shutil.copytree(tiny_fashion, bad_gzip)
    (bad_gzip / "train-images-idx3-ubyte").unlink()
    (bad_gzip / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"not gzip" * 10)
    (tmp / "a_file").write_text("")
    with one_thread():
        three = image_folders(tmp / "three", ["c0", "c1", "c2"], ["c0", "c1", "c2"])
        assert cli.main(["pretrain", "--data", "imagefolder", "--data-dir", three,
                         "--image-size", "16", "--batch-size", "2", "--epochs", "1",
                         "--out", str(tmp / "three_run"), "--quiet"]) == 0
    return SimpleNamespace(tmp=tmp, data=tiny_fashion, fp=pretrained, ref=ref,
                           ref_dir=reference_run, three=str(tmp / "three_run" / CHECKPOINT_NAME),
                           two=image_folders(tmp / "two", ["c0", "c1"], ["c0", "c1"]))


def quantize(f, *extra: str) -> list[str]:
    return ["quantize", "--from", f.fp, "--data-dir", f.data, "--limit", "64", "--batch-size",
            "32", "--epochs", "1", "--out", str(f.tmp / "q"), "--quiet", *extra]


@pytest.mark.parametrize("levels", ["", "1,-1", "-1,0,0,1", "nan,1", "-1,inf", "1", "a,b"])
def test_bad_custom_levels(files, capsys, levels):
    fails(capsys, quantize(files, "--constraint", "custom", "--levels", levels), "level")


@pytest.mark.parametrize("argv, needles", [
    (lambda f: quantize(f, "--constraint", "ternary", "--levels", "-1,0,1"),
     ["--constraint ternary and --levels -1,0,1 name two level sets"]),
    (lambda f: quantize(f, "--constraint", "custom"), ["--constraint custom needs --levels"]),
    (lambda f: quantize(f, "--exclude", "."), ["no layer left to quantize"]),
    (lambda f: quantize(f, "--exclude", "("), ["not a regular expression"]),
    (lambda f: quantize(f, "--limit", "16"), ["no training step", "batch of 32"]),
    # data
    (lambda f: quantize(f, "--data-dir", str(f.tmp / "empty")),
     ["IDX files not found", "apt-get install dataset-fashion-mnist"]),
    (lambda f: quantize(f, "--data-dir", str(f.tmp / "truncated_idx")), ["bytes, expected"]),
    (lambda f: quantize(f, "--data-dir", str(f.tmp / "bad_gzip")), ["cannot read IDX file"]),
    (lambda f: ["quantize", "--from", f.three, "--data-dir", f.data, "--out",
                str(f.tmp / "q3")], ["3-class", "the data has 10 classes"]),
    (lambda f: ["evaluate", f.three, "--data-dir", f.two, "--image-size", "16"],
     ["3-class", "the data has 2 classes"]),
    # checkpoints from another run, damaged or missing
    (lambda f: quantize(f, "--constraint", "ternary", "--out", f.ref_dir, "--resume"),
     ["--levels 'ternary' (the run's: 'binary')"]),
    (lambda f: ["pretrain", "--model", "resnet18", "--data-dir", f.data, "--out",
                os.path.dirname(f.fp), "--resume"], ["--model 'resnet18' (the run's: 'resnet20')"]),
    (lambda f: ["pretrain", "--data-dir", f.data, "--out", f.ref_dir, "--resume"],
     ["from another run (mode: 'quantize'"]),
    (lambda f: quantize(f, "--from", f.ref), ["not a pretraining checkpoint"]),
    (lambda f: ["evaluate", str(f.tmp / "truncated.pt")], ["truncated or corrupted"]),
    (lambda f: ["evaluate", str(f.tmp / "flipped.pt")], ["fails its checksum"]),
    (lambda f: quantize(f, "--from", str(f.tmp / "flipped.pt")), ["fails its checksum"]),
    (lambda f: ["summary", str(f.tmp / "missing.pt")], ["does not exist"]),
    # outputs
    (lambda f: quantize(f, "--out", str(f.tmp / "a_file" / "run")),
     ["cannot write to the output directory", "Not a directory"]),
    (lambda f: quantize(f, "--out", f.ref_dir), ["already holds a run", "--resume"]),
    (lambda f: ["export", f.ref, str(f.tmp / "a_file" / "x.safetensors")], ["cannot write"]),
])
def test_bad_input_is_one_line(files, capsys, argv, needles):
    fails(capsys, argv(files), *needles)


def test_read_only_output_is_refused_before_training(files, capsys):
    try:                                       # root may write anywhere but in /sys
        os.mkdir("/sys/cbp-probe")
    except OSError:
        pass
    else:
        os.rmdir("/sys/cbp-probe")
        pytest.skip("no read-only directory to try")
    fails(capsys, quantize(files, "--out", "/sys/cbp-run"), "cannot write to the output")


def test_corrupt_exports_are_refused(files, tmp_path):
    packed = str(tmp_path / "x.safetensors")
    assert cli.main(["export", files.ref, packed]) == 0
    data = open(packed, "rb").read()
    for name, blob in (("truncated", data[:-50]), ("flipped", data[:-50] + bytes([data[-50] ^ 1])
                                                   + data[-49:])):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ExportError):
            read_packed(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="not a whole zip archive"):
        load_checkpoint(packed)      # an export handed where a checkpoint belongs


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--model", "vgg", "--out", "o"], "invalid choice: 'vgg'"),
    (["quantize", "--constraint", "quaternary", "--out", "o"], "invalid choice: 'quaternary'"),
    (["pretrain", "--batch-size", "0", "--out", "o"], "must be at least 1, got 0"),
    (["pretrain", "--epochs", "ten", "--out", "o"], "expected an integer, got 'ten'"),
])
def test_argparse_mistakes_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    (None, "neither a file nor a packaged config"),
    ("[quantize\n", "not valid TOML"),
    ("[quantize]\nepoch = 3\n", "unknown key(s) epoch"),
    ("[quantize]\nquiet = \"yes\"\n", "quiet must be true or false"),
    ("[quantize]\nexclude = \"layer1\"\nepochs = [1]\n", "epochs takes one value"),
])
def test_bad_configs(files, tmp_path, capsys, text, needle):
    config = tmp_path / "c.toml"
    if text is not None:
        config.write_text(text)
    fails(capsys, quantize(files, "--config", str(config)), needle)


def test_config_values_are_checked_like_flags(files, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[quantize]\nepochs = 1.5\n")
    with pytest.raises(SystemExit):
        cli.main(quantize(files, "--config", str(config)))
    assert "argument --epochs: expected an integer, got '1.5'" in capsys.readouterr().err


# ---- files that would run code -----------------------------------------------------------------

@pytest.mark.parametrize("kind, needle", [("torch.save", "refusing to load"),
                                          ("raw pickle", "not a whole zip archive")])
def test_a_crafted_pickle_is_refused(files, tmp_path, capsys, kind, needle):
    marker = str(tmp_path / "marker")
    evil = str(tmp_path / "evil.pt")
    state = {"format": "cbp-checkpoint-v1", "meta": {}, "model": Payload(marker)}
    if kind == "torch.save":
        torch.save(state, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(state, f)
    resume_dir = tmp_path / "run"
    resume_dir.mkdir()
    shutil.copy(evil, resume_dir / CHECKPOINT_NAME)
    for argv in (["evaluate", evil], quantize(files, "--from", evil),
                 quantize(files, "--out", str(resume_dir), "--resume")):
        fails(capsys, argv, needle)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not os.path.exists(marker)
    if kind == "torch.save":   # the file is a real exploit: loading it unsafely runs the code
        torch.load(evil, weights_only=False)
        assert os.path.exists(marker)
