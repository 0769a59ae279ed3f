"""Refusals made before a run starts: never replace a user's files, never resume differently.

``cbp pretrain`` / ``cbp quantize`` call these before loading data or building a model, so a
mistake costs seconds, not an epoch.

* :func:`check_run_dir`: a new run replaces nothing it did not write without ``--overwrite``;
  ``--resume`` needs a checkpoint to continue, and contradicts ``--overwrite``.
* :func:`check_sources`: ``--overwrite`` never replaces the checkpoint the run starts from.
* :func:`lock_run_dir`: one run at a time writes a directory.
* :func:`resume_settings`: ``--resume`` continues a run with the settings it was started with.
  A flag left out takes the run's value; a flag that would change a setting is refused, naming
  it - except the few that say where and how long to run (:data:`MAY_CHANGE_ON_RESUME`), which
  apply and are reported. Settings from ``--config`` count as given. Each recorded value passes
  its flag's own check before it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator

from ..files.checkpoint import CheckpointError
from ..training.run_state import load_run_checkpoint
from ..training.runs import CHECKPOINT_NAME, LOCK_NAME, RUN_FILES
from .options import build_parsers

# Settings that are not the run's to keep: where it is written, how it is shown, the machine.
NOT_RECORDED = frozenset({"command", "out", "resume", "overwrite", "config", "quiet", "device"})
# Recorded, yet a resumed run may change them: where its inputs are now, how long it runs, with
# how many loader processes, and how often it writes checkpoints. (The pretrained source matters
# only at the start: a resumed run takes its model from the checkpoint. A distilled run reloads its
# teacher from --teacher or --from, which may have moved: the checkpoint's teacher_sha256 checks
# it is the same file.)
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "data_dir", "download", "workers", "on_nan",
                                  "checkpoint_every", "from_checkpoint", "weights", "teacher"})


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":   # once under torchrun
        print(f"cbp: {message}", file=sys.stderr, flush=True)


def check_run_dir(out: str, resume: bool, overwrite: bool) -> bool:
    """Whether the run continues a checkpoint in ``out``; refuses what would lose a file.

    Without ``overwrite`` a new run starts only where none of ``cbp.training.runs.RUN_FILES`` exists - a
    ``log.jsonl`` there may be the user's own. ``resume`` with no checkpoint starts a new run
    (and says so) where ``out`` holds none of them, and is refused where it does.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "pass one of them")
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    has_checkpoint = CHECKPOINT_NAME in found
    if overwrite or (resume and has_checkpoint):
        return resume
    if resume and found:
        raise ValueError(f"--resume: {out} holds {', '.join(found)} but no {CHECKPOINT_NAME} "
                         "to continue from; pass --overwrite instead of --resume to start a new "
                         "run there (replacing them), or choose another --out")
    if resume:
        _say(f"{out} holds no {CHECKPOINT_NAME} to resume: starting a new run there")
        return False
    if has_checkpoint:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    if found:
        raise ValueError(f"{out} already holds {', '.join(found)}, which a new run would replace: "
                         "pass --overwrite to replace it, or choose another --out")
    return False


def check_sources(args) -> None:
    """Refuse ``--overwrite`` where the model to start from (``--from`` / ``--weights``) is one
    of the files it would replace - the run would delete its own starting point."""
    if not args.overwrite:
        return
    ours = {os.path.realpath(os.path.join(args.out, name)) for name in RUN_FILES}
    for key in ("from_checkpoint", "weights"):
        path = getattr(args, key, None)
        if path and os.path.realpath(path) in ours:
            raise ValueError(f"{_flag(key)} {path} is a file of --out {args.out}, which "
                             "--overwrite would replace: copy it elsewhere first, or choose "
                             "another --out")


@contextlib.contextmanager
def lock_run_dir(out: str) -> Iterator[None]:
    """Hold ``OUT/.cbp-lock`` while a run writes ``out``; refuse if another live run holds it.

    An exclusive ``flock`` on the lock file: the kernel drops it when its process ends, however
    it ends, so the lock file a killed run leaves behind is simply taken over. The file keeps the
    holder's pid, to name it, and is removed when the run ends (so a refused run leaves nothing
    behind); a lock taken on a file that was removed meanwhile is dropped and taken again. Under
    torchrun rank 0 holds it for all processes (the others write nothing).
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = os.path.join(out, LOCK_NAME)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ValueError(f"{out} is being written by another cbp run (pid {holder}): wait "
                             "for it to end, or choose another --out") from None
        if _same_file(lock, path):
            break
        lock.close()   # its holder removed it after we opened it: lock the new one
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        os.unlink(path)   # before unlocking: no one can lock this file afterwards
        lock.close()


def _same_file(file, path: str) -> bool:
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(file.fileno())
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def recorded_settings(args) -> dict:
    """The settings a checkpoint keeps (under ``meta["settings"]``) for :func:`resume_settings`."""
    return {key: value for key, value in vars(args).items()
            if key not in NOT_RECORDED and not key.startswith("_")}


def _flag(key: str) -> str:
    return "--" + {"from_checkpoint": "from"}.get(key, key).replace("_", "-")


def resume_settings(args, given: set[str]) -> list[str]:
    """Fill ``args`` in from the settings of the checkpoint it resumes; return what changed.

    ``given`` holds the settings the command line (or ``--config``) set. One that differs from
    the run's is refused naming every such flag, unless it is in :data:`MAY_CHANGE_ON_RESUME`:
    then it applies, and the returned lines say so. Checkpoints written before settings were
    recorded are resumed as before, with the values given now.
    """
    path = os.path.join(args.out, CHECKPOINT_NAME)
    meta = load_run_checkpoint(path)["meta"]
    if meta["mode"] != args.command:
        raise CheckpointError(f"checkpoint {path} is from another run (mode: {meta['mode']!r}, "
                              f"this run: {args.command!r})")
    recorded = meta.get("settings")
    if recorded is None:
        return []
    _check_recorded(recorded, args.command, path)
    differ = [key for key in sorted(given) if key in recorded and key not in NOT_RECORDED
              and getattr(args, key) != recorded[key]]
    refused = [key for key in differ if key not in MAY_CHANGE_ON_RESUME]
    if refused:
        changes = ", ".join(f"{_flag(k)} {getattr(args, k)!r} (the run's: {recorded[k]!r})"
                            for k in refused)
        raise ValueError(f"--resume continues {args.out} with the settings it was started with, "
                         f"and these differ: {changes}; drop them, or start a new run "
                         "(--overwrite, or another --out)")
    for key, value in recorded.items():
        if key not in given and hasattr(args, key):
            setattr(args, key, value)
    return [f"resuming {args.out} with {_flag(k)} {getattr(args, k)!r} (it ran with "
            f"{recorded[k]!r})" for k in differ]


def _check_recorded(recorded: dict, command: str, path: str) -> None:
    """Each recorded setting as its flag would accept it (the same type, range and choices), or
    a one-line error naming the file and the setting: a checkpoint may have been edited."""
    flags = build_parsers()[1][command]
    for key, value in recorded.items():
        action = flags.by_key[key][0] if key in flags.by_key else None
        if action is None or key in NOT_RECORDED or (value is None and
                                                     flags.defaults[action.dest] is None):
            continue   # a setting of another cbp version, or one left unset
        if not _accepts(action, value):
            raise CheckpointError(f"checkpoint {path}: settings.{key} ({_flag(key)}) is "
                                  f"{value!r}, which {_flag(key)} does not accept")


def _accepts(action: argparse.Action, value) -> bool:
    """Whether the flag of ``action`` could have stored ``value``."""
    if action.nargs == 0:   # a switch
        return isinstance(value, bool)
    if action.nargs in ("*", "+"):
        return isinstance(value, list) and all(_accepts_one(action, v) for v in value)
    if isinstance(value, (list, tuple)):   # --g-increments' pairs: CBPConfig checks them
        return action.dest == "g_increments"
    return _accepts_one(action, value)


def _accepts_one(action: argparse.Action, value) -> bool:
    """The flag's type turns the value's text back into the value (None: "none" where the flag
    means off by it), and its choices hold it."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        return False
    try:
        stored = action.type(str(value)) if action.type is not None else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return stored == value and (action.choices is None or stored in action.choices)
