"""cbp.files.checkpoint: atomic writes (a killed or failed write keeps the last whole file), the
usual permissions."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch
from conftest import spawn

from cbp.files.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
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
