"""cbp.files.checkpoint: atomic writes (a killed or failed write keeps the last whole file), the
usual permissions; what a damaged, foreign or unsafe file is refused with."""

from __future__ import annotations

import contextlib
import errno
import fractions
import os
import pickle
import signal
import stat
import zipfile

import pytest
import torch
from conftest import FullDisk, spawn

from cbp.files.checkpoint import (
    FORMAT,
    FORMAT_V1,
    TMP_SUFFIX,
    CheckpointError,
    WriteError,
    atomic_write,
    load_checkpoint,
    load_error_reason,
    refused_as_unsafe,
    remove_stale_temporaries,
    save_checkpoint,
    unsafe_reason,
)

KILLED_WRITER = """
import io, os, signal, sys, torch
import cbp.files.checkpoint
from cbp.files.checkpoint import save_checkpoint
if sys.argv[2] == "naive":
    def naive(path, write, mode="wb"):
        with open(path, mode) as f:
            write(f)
    cbp.files.checkpoint.atomic_write = naive
save_checkpoint({"i": 1, "blob": torch.full((100_000,), 1.0)}, sys.argv[1])
real_save = torch.save
def save_half_then_die(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
save_checkpoint({"i": 2, "blob": torch.full((100_000,), 2.0)}, sys.argv[1])
"""


@pytest.mark.parametrize("writer", ["atomic", "naive"])
def test_sigkill_inside_a_checkpoint_write_leaves_the_last_whole_one(tmp_path, writer):
    path = str(tmp_path / "c.pt")
    proc = spawn(KILLED_WRITER, path, writer)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    if writer == "naive":   # the control: a writer that is not atomic fails this test
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        return
    state = load_checkpoint(path)
    assert state["i"] == 1 and torch.equal(state["blob"], torch.full((100_000,), 1.0))
    remove_stale_temporaries(str(tmp_path))   # what the next run does first
    assert os.listdir(tmp_path) == ["c.pt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint({"i": 1}, path)

    def half_then_fail(f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")
    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert load_checkpoint(path)["i"] == 1 and os.listdir(tmp_path) == ["c.pt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    """Like open(): 0666 less the umask, not the temporary file's private 0600."""
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a"), lambda f: f.write(b"x"))
        os.umask(0o077)
        atomic_write(str(tmp_path / "b"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o600


def test_a_full_disk_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError about a zip position; the error
    raised names the disk's own error and the file, and whether an earlier one is kept."""
    path = str(tmp_path / "c.pt")
    fdopen = os.fdopen

    def on_a_full_disk(fd, *args, **kw):   # ENOSPC first, then EIO
        return FullDisk(fdopen(fd, *args, **kw), errno.EIO)
    monkeypatch.setattr(os, "fdopen", on_a_full_disk)
    with pytest.raises(WriteError) as new:
        save_checkpoint({"i": 1}, path)
    assert str(new.value) == f"cannot write {path}: No space left on device"
    monkeypatch.undo()
    save_checkpoint({"i": 1}, path)
    monkeypatch.setattr(os, "fdopen", on_a_full_disk)
    with pytest.raises(WriteError, match="No space left on device; the previous file is untouched"):
        save_checkpoint({"i": 2}, path)
    assert os.listdir(tmp_path) == ["c.pt"] and load_checkpoint(path)["i"] == 1

    def zip_writer(f):   # a writer that reports its own error for the disk's: the first is named
        for _ in range(2):
            with contextlib.suppress(OSError):
                f.write(b"x")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(WriteError, match="No space left on device; the previous file is untouched"):
        atomic_write(path, zip_writer)
    monkeypatch.undo()

    below_a_file = str(tmp_path / "c.pt" / "d.pt")   # its directory cannot be made
    with pytest.raises(WriteError, match=f"cannot write {below_a_file}: "):
        atomic_write(below_a_file, lambda f: f.write(b"x"))

    def refuse(f):   # an error that is no OSError is the writer's own: raised as it is
        raise KeyError("not a disk error")
    with pytest.raises(KeyError):
        atomic_write(path, refuse)
    assert os.listdir(tmp_path) == ["c.pt"]


def test_the_temporary_is_a_hidden_file_named_after_the_target(tmp_path):
    seen = []
    atomic_write(str(tmp_path / "c.pt"), lambda f: seen.extend(os.listdir(tmp_path)))
    (tmp,) = seen
    assert tmp.startswith(".c.pt.") and tmp.endswith(TMP_SUFFIX) and len(tmp) > len(".c.pt.cbp-tmp")
    assert os.listdir(tmp_path) == ["c.pt"]
    names = [".c.pt.k3j2" + TMP_SUFFIX, ".log.jsonl.x9" + TMP_SUFFIX, "mine" + TMP_SUFFIX,
             ".c.pt.k3j2", "c.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(str(tmp_path), ("c.pt",))       # only the writes of c.pt
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - {names[0]})
    remove_stale_temporaries(str(tmp_path))                  # any file's
    assert sorted(os.listdir(tmp_path)) == [".c.pt.k3j2", "c.pt"]


def test_damaged_foreign_and_unsafe_files_are_refused_naming_why(tmp_path):
    path = str(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not exist"):
        load_checkpoint(path)
    blob = torch.arange(1000, dtype=torch.float32)
    save_checkpoint({"blob": blob}, path)
    data = bytearray(open(path, "rb").read())
    assert load_checkpoint(path)["format"] == FORMAT
    at = bytes(data).index(blob[500:502].numpy().tobytes())   # stored uncompressed
    data[at] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupted: \S+ fails its checksum"):
        load_checkpoint(path)
    open(path, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupted, or not a checkpoint at all"):
        load_checkpoint(path)
    with zipfile.ZipFile(path, "w") as archive:             # a whole zip, not torch's
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated or corrupted$"):
        load_checkpoint(path)
    for foreign in ([1, 2], {"epoch": 1}, {"format": "cbp-checkpoint-v3"}):
        torch.save(foreign, path)
        with pytest.raises(CheckpointError, match=f"{path} is not a cbp checkpoint"):
            load_checkpoint(path)
    torch.save({"format": FORMAT_V1, "epoch": 3}, path)       # read; runs.py brings it up to date
    assert load_checkpoint(path) == {"format": FORMAT_V1, "epoch": 3}
    torch.save({"format": FORMAT, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as unsafe:
        load_checkpoint(path)
    assert str(unsafe.value) == (f"refusing to load {path}: it would call fractions.Fraction "
                                 "when unpickled, and cbp never runs code from a file")
    assert refused_as_unsafe(unsafe.value.__cause__)
    # torch's own default (safe since torch 2.6) turned off by the environment, as torch < 2.6
    # had it: still refused, because cbp asks for weights_only itself
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        with pytest.raises(CheckpointError, match="^refusing to load .* fractions.Fraction"):
            load_checkpoint(path)
    assert not refused_as_unsafe(pickle.UnpicklingError("invalid load key, 'x'."))
    assert not refused_as_unsafe(RuntimeError("Weights only load failed"))
    assert unsafe_reason(pickle.UnpicklingError("Weights only load failed")) == (
        "it holds more than plain data when unpickled, and cbp never runs code from a file")


def test_load_error_reason_keeps_the_line_that_says_why():
    two = RuntimeError('Error(s) in loading state_dict for Net:\n\tMissing key(s) in state_dict: '
                       '"fc.bias". \n\tUnexpected key(s) in state_dict: "head.bias". ')
    assert load_error_reason(two) == ('Error(s) in loading state_dict for Net: Missing key(s) in '
                                      'state_dict: "fc.bias".')
    assert load_error_reason(ValueError("\n  \nsize mismatch for fc.weight\nnext line")) == (
        "size mismatch for fc.weight")
    assert load_error_reason(KeyError()) == "KeyError"                 # no message: its type
    assert load_error_reason(ValueError(" \n ")) == "ValueError"
    assert load_error_reason(ValueError("x" * 300)) == "x" * 300
    assert load_error_reason(ValueError("x" * 301)) == "x" * 297 + "..."
    assert load_error_reason(ValueError("abcdefghijk"), limit=10) == "abcdefg..."
