"""Checkpoints that are never half-written and never execute code when read.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then renamed over
the target: a crash or SIGKILL at any moment leaves either the old or the new file, whole. Reads
check the zip archive's CRC-32s, then use ``torch.load(weights_only=True)``, which refuses
pickles that would run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable

import torch

FORMAT = "cbp-checkpoint-v2"
FORMAT_V1 = "cbp-checkpoint-v1"  # still read: cbp.runs brings it up to date
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, unsafe or from another run; one-line message."""


def _new_file_mode() -> int:
    """The permissions ``open()`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file, fsync it and rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), _new_file_mode())  # mkstemp's 0600 would hide it from others
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory: str) -> None:
    """Delete the temporary files of writes killed half-way (SIGKILL, power loss)."""
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            os.unlink(os.path.join(directory, name))


def save_checkpoint(state: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def _check_archive(path: str) -> None:
    """Refuse anything but a whole zip archive whose every member matches its CRC-32.

    ``torch.load`` reads tensor bytes without checking them, so a flipped bit on disk would load
    as a silently different model; the archive's own checksums catch it (one read of the file).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted, or not a checkpoint "
                              "at all (not a whole zip archive)") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: {bad} fails its checksum")


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, or raise ``CheckpointError``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(f"refusing to load {path}: it is not a plain-data checkpoint "
                              f"({first_line})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted") from err
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{path} is not a cbp checkpoint")
    return state
