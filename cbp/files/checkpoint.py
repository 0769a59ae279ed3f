"""Checkpoints that are never half-written and never execute code when read.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then renamed over
the target: a crash or SIGKILL at any moment leaves either the old or the new file, whole. Reads
check the zip archive's CRC-32s, then use ``torch.load(weights_only=True)``, which refuses
pickles that would run code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable

import torch

FORMAT = "cbp-checkpoint-v2"
FORMAT_V1 = "cbp-checkpoint-v1"  # still read: cbp.training.runs brings it up to date
TMP_SUFFIX = ".cbp-tmp"   # temporaries are ".<target name>.<random>.cbp-tmp": never a user's name


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, unsafe or from another run; one-line message."""


class WriteError(OSError):
    """A file could not be written (a full disk, no permission); names the file, one line."""


class _RecordingFile:
    """A file that remembers the first ``OSError`` of a write.

    ``torch.save`` turns a failed write (a full disk) into a ``RuntimeError`` about a zip
    position; remembering the real error lets :func:`atomic_write` name it and the file.
    """

    def __init__(self, file) -> None:
        self._file, self.error = file, None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _new_file_mode() -> int:
    """The permissions ``open()`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file, fsync it and rename it to ``path``.

    A failed write (a full disk) leaves ``path`` as it was and raises :class:`WriteError`
    naming it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp, recording = None, None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX,
                                   dir=directory)
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), _new_file_mode())  # mkstemp's 0600 would hide it from others
            recording = _RecordingFile(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = recording.error if recording is not None and recording.error else err
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            kept = "; the previous file is untouched" if os.path.exists(path) else ""
            raise WriteError(f"cannot write {path}: {cause.strerror or cause}{kept}") from err
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory: str, targets: tuple[str, ...] | None = None) -> None:
    """Delete the temporaries that writes of ``targets`` (None: of any file) killed half-way left
    (SIGKILL, power loss); other files, whatever their names, are not ours to delete."""
    for name in os.listdir(directory):
        if name.endswith(TMP_SUFFIX) and (targets is None
                                          or any(name.startswith(f".{t}.") for t in targets)):
            os.unlink(os.path.join(directory, name))


def load_error_reason(err: Exception, limit: int = 300) -> str:
    """One line of why ``load_state_dict`` failed. PyTorch's first line only says that it did
    ("Error(s) in loading state_dict for ResNet:"); the reason - missing keys, a size mismatch -
    is on the next, so both are kept, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


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


def refused_as_unsafe(err: Exception) -> bool:
    """Whether ``torch.load(weights_only=True)`` raised because the file holds more than plain
    data (rather than because it is no pickle at all)."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def unsafe_reason(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without PyTorch's advice to load it
    with ``weights_only=False`` - which would run whatever code the file carries."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f"it would call {found.group(1)}" if found else "it holds more than plain data"
    return f"{what} when unpickled, and cbp never runs code from a file"


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, or raise ``CheckpointError``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if refused_as_unsafe(err):
            raise CheckpointError(f"refusing to load {path}: {unsafe_reason(err)}") from err
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted") from err
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{path} is not a cbp checkpoint")
    return state
