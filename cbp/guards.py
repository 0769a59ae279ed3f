"""Refusals made before a run starts: never replace a user's files, never resume differently.

``cbp pretrain`` / ``cbp quantize`` call these before loading data or building a model, so a
mistake costs seconds, not an epoch.

* :func:`check_run_dir`: a new run replaces nothing it did not write without ``--overwrite``;
  ``--resume`` needs a checkpoint to continue, and contradicts ``--overwrite``.
* :func:`resume_settings`: ``--resume`` continues a run with the settings it was started with.
  A flag left out takes the run's value; a flag that would change a setting is refused, naming
  it - except the few that say where and how long to run (:data:`MAY_CHANGE_ON_RESUME`), which
  apply and are reported.
"""

from __future__ import annotations

import os
import sys

from .checkpoint import CheckpointError
from .plots import CURVES_PNG, HISTOGRAMS_PNG
from .run_state import load_run_checkpoint
from .runs import CHECKPOINT_NAME, RUN_FILES

OUR_FILES = (*RUN_FILES, CURVES_PNG, HISTOGRAMS_PNG)   # what a run writes into its directory

# Settings that are not the run's to keep: where it is written, how it is shown, the machine.
NOT_RECORDED = frozenset({"command", "out", "resume", "overwrite", "config", "quiet", "device"})
# Recorded, yet a resumed run may change them: where its inputs are now, how long it runs, and
# with how many loader processes. (The pretrained source matters only at the start: a resumed
# run takes its model from the checkpoint. A distilled run reloads its teacher from --teacher or
# --from, which may have moved: the checkpoint's teacher_sha256 checks it is the same file.)
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "data_dir", "download", "workers", "on_nan",
                                  "from_checkpoint", "weights", "teacher"})


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":   # once under torchrun
        print(f"cbp: {message}", file=sys.stderr, flush=True)


def check_run_dir(out: str, resume: bool, overwrite: bool) -> bool:
    """Whether the run continues a checkpoint in ``out``; refuses what would lose a file.

    Without ``overwrite`` a new run starts only where none of :data:`OUR_FILES` exists - a
    ``log.jsonl`` there may be the user's own. ``resume`` with no checkpoint starts a new run
    (and says so) where ``out`` holds none of them, and is refused where it does.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "pass one of them")
    found = [name for name in OUR_FILES if os.path.exists(os.path.join(out, name))]
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
