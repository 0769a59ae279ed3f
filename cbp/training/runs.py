"""What a run directory holds, and how it is read back: the one place that knows its files
(:data:`RUN_FILES`; ``cbp.cli.guards`` and ``cbp.training.plots`` take the names from here).

``OUT/log.jsonl``: one JSON row per finished epoch (loss, L_sum, g, lambda, CFS, accuracy, ...);
``OUT/histograms.jsonl``: one row per epoch, the weights of the largest quantized layer over its
scale; ``OUT/checkpoint.pt``: where the run stands (:class:`Position`), the model, both optimizers,
the CBP state, the RNG and the run's identity (``meta``: model, data, levels - what ``--resume``
and ``quantize --from`` check, and what :func:`load_model` rebuilds the model from).

Checkpoints of format v1 (cbp before the penalty and the loss were summed apart) are read too:
:func:`_upgrade` turns them into today's form.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..core.config import CBPConfig
from ..core.layers import prepare, quantized_layers
from ..files.checkpoint import (
    FORMAT_V1,
    CheckpointError,
    WriteError,
    atomic_write,
    load_error_reason,
    remove_stale_temporaries,
)
from ..zoo.models import model_options, rebuild_model
from .run_state import load_run_checkpoint, today_names

LOG_NAME, HIST_NAME, CHECKPOINT_NAME = "log.jsonl", "histograms.jsonl", "checkpoint.pt"
CURVES_PNG, OSCILLATIONS_PNG, HISTOGRAMS_PNG = "curves.png", "oscillations.png", "histograms.png"
# Every file a run writes into its directory: a new run refuses to replace any of them without
# --overwrite (cbp.cli.guards), and a fresh start removes them all (cbp.training.train).
RUN_FILES = (LOG_NAME, HIST_NAME, CHECKPOINT_NAME, CURVES_PNG, OSCILLATIONS_PNG, HISTOGRAMS_PNG)
# Held (flock) by the run writing the directory and removed when it ends; a killed run leaves it,
# and the next run takes it over. It holds no result, so it never blocks a new run.
LOCK_NAME = ".cbp-lock"
HIST_RANGE, HIST_BINS = 1.6, 160  # histogram of w / scale over [-1.6, 1.6]
# meta entries that must match for a checkpoint to continue a run
IDENTITY_KEYS = ("mode", "model", "dataset", "num_classes", "in_channels", "levels", "factors",
                 "scale", "vocab", "teacher_sha256")


# ---- the logs ------------------------------------------------------------------------------------

def append_row(path: str, row: dict) -> None:
    """Append one JSON line and fsync it: a crash loses at most the row being written."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(f"cannot append to {path}: {err.strerror or err}") from err


def keep_rows_up_to(path: str, epoch: int) -> None:
    """Drop log rows written after the checkpoint a resumed run starts from (and a torn line)."""
    if not os.path.exists(path):
        return
    rows = [json.dumps(row) + "\n" for row in read_jsonl(path) if row["epoch"] <= epoch]
    atomic_write(path, lambda f: f.writelines(rows), mode="w")


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL log, one JSON object per line.

    Every row is appended with its newline in one write, so a last line without a newline that
    does not parse was torn by a crash mid-append: it is left out, and the run resumes and plots
    from the rows before it. A damaged line anywhere else is an error naming it.
    """
    with open(path) as f:
        *lines, tail = f.read().split("\n")   # tail: "" after a final newline
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            row = _json_object(line)
            if row is None:
                raise ValueError(f"{path}, line {number}: not a JSON object with an integer "
                                 "'epoch'; the log is damaged")
            rows.append(row)
    last = _json_object(tail) if tail.strip() else None
    return rows + ([last] if last is not None else [])


def _json_object(line: str) -> dict | None:
    """The row of a line, or None: every row of a run's logs is an object naming its epoch."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return row if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def clear_run_dir(out_dir: str, fresh: bool) -> None:
    """Before a run's first step: the temporaries of an interrupted write removed, and for a
    fresh run every file an earlier run wrote (``RUN_FILES``; nothing else of the directory)."""
    remove_stale_temporaries(out_dir, RUN_FILES)
    for name in RUN_FILES if fresh else ():
        if os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))


def trim_logs(out_dir: str, epoch: int, model: nn.Module, hist_layer: str | None,
              fresh: bool) -> None:
    """The logs as the checkpoint of ``epoch`` left them (later rows dropped); a fresh run's
    weight histogram of its start."""
    keep_rows_up_to(os.path.join(out_dir, LOG_NAME), epoch)
    keep_rows_up_to(os.path.join(out_dir, HIST_NAME), epoch)
    if hist_layer and fresh:
        append_row(os.path.join(out_dir, HIST_NAME), weight_histogram(model, hist_layer, 0))


def histogram_layer(model: nn.Module) -> str | None:
    """The quantized layer whose weights the histograms follow: the largest one."""
    layers = quantized_layers(model)
    return max(layers, key=lambda n: layers[n].weight.numel()) if layers else None


def weight_histogram(model: nn.Module, layer_name: str, epoch: int) -> dict:
    layer = model.get_submodule(layer_name)
    ratio = (layer.weight.detach() / layer.cbp_scale).flatten().cpu().numpy()
    counts, _ = np.histogram(ratio, bins=HIST_BINS, range=(-HIST_RANGE, HIST_RANGE))
    return {"epoch": epoch, "layer": layer_name, "range": HIST_RANGE, "counts": counts.tolist(),
            "factors": layer.cbp_factors.tolist()}


# ---- the checkpoint ------------------------------------------------------------------------------

@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs done and ``step`` steps of the next (0 at an epoch end).

    ``loss_sum`` is the training-loss sum of those ``step`` steps (summed over processes), so the
    epoch's mean loss and its L_sum come out the same whether or not the epoch was interrupted;
    ``loss_terms`` likewise sums a distilled run's two loss terms (task, divergence).
    """

    epoch: int
    step: int = 0
    loss_sum: torch.Tensor | None = None
    loss_terms: torch.Tensor | None = None


def describe(mode: str, model: nn.Module, model_name: str, dataset: str, num_classes: int,
             in_channels: int, input_size: list[int], config: CBPConfig | None = None,
             task: str | None = None,
             vocab: str | None = None) -> dict:
    """A run's identity (``meta``): enough to check a resume and to rebuild its model
    (``model_options``: what :func:`cbp.zoo.models.rebuild_model` needs besides the weights).

    A language model's also names its task and its vocabulary (the characters of its tokens); a
    CBP run's its level set (``levels``: its name, or ``custom``) and factors, and its layers.
    """
    meta = {"mode": mode, "dataset": dataset, "num_classes": num_classes,
            "in_channels": in_channels, "input_size": input_size, "model": model_name,
            "model_options": model_options(model)}
    meta.update({k: v for k, v in (("task", task), ("vocab", vocab)) if v is not None})
    if config is not None:
        meta.update(levels=config.levels if isinstance(config.levels, str) else "custom",
                    factors=list(config.factors),
                    include=list(config.include), exclude=list(config.exclude),
                    skip_first_last=config.skip_first_last)
        if config.scale != "per-layer":   # absent: per layer, as every run before the option
            meta["scale"] = config.scale
    return meta


def checkpoint_state(pos: Position, meta: dict, model: nn.Module,
                     optimizer: torch.optim.Optimizer, lagrangian=None, scheduler=None,
                     oscillation=None, plan: dict | None = None) -> dict:
    """Everything a checkpoint holds (``cbp.files.checkpoint.save_checkpoint`` adds the format).

    ``plan``: what fixes the batches of an epoch (seed, batch size, epoch length, samples).
    """
    return {
        "epoch": pos.epoch, "step": pos.step, "loss_sum": pos.loss_sum,
        "loss_terms": pos.loss_terms, "meta": meta,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "cbp": lagrangian.state_dict() if lagrangian else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "oscillation": oscillation.state_dict() if oscillation else None,
        "rng": torch.get_rng_state(), "plan": plan,
    }


def restore_state(state: dict, source: str, meta: dict, model: nn.Module,
                  optimizer: torch.optim.Optimizer, lagrangian=None, scheduler=None,
                  world_size: int = 1, oscillation=None, plan: dict | None = None) -> Position:
    """Load a checkpoint's ``state`` into the run's parts; returns where it stands.

    Refuses one of another run (``IDENTITY_KEYS``), one that does not fit the model, or one taken
    mid-epoch with another ``plan`` (see :func:`checkpoint_state`).
    """
    if plan is not None:
        check_same_plan(state, plan, source)
    state = _upgrade(state, world_size)
    # a library user's run may still say "constraint", and so may the state of its start that
    # fit keeps in memory for on_nan="lower-lr" (a file's is read in today's names)
    meta, saved = today_names(meta), today_names(state["meta"])
    for key in IDENTITY_KEYS:
        if saved.get(key) != meta.get(key):
            raise CheckpointError(f"{source} is from another run ({key}: "
                                  f"{saved.get(key)!r}, this run: {meta.get(key)!r})")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lagrangian is not None:
            lagrangian.load_state_dict(state["cbp"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if oscillation is not None and state.get("oscillation") is not None:  # none before v2
            oscillation.load_state_dict(state["oscillation"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{source} does not fit this model: "
                              f"{load_error_reason(err)}") from err
    torch.set_rng_state(state["rng"])
    return Position(int(state["epoch"]), int(state.get("step", 0)), state.get("loss_sum"),
                    state.get("loss_terms"))


def check_same_plan(state: dict, plan: dict, source: str) -> None:
    """Refuse to resume a checkpoint taken mid-epoch with another seed, batch size or epoch
    length: the rest of the epoch would not be the batches the run skipped to."""
    saved, now = state.get("plan"), plan
    if not state.get("step") or saved is None or saved == now:
        return
    changed = ", ".join(f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now
                        if saved.get(key) != now[key])
    raise CheckpointError(f"{source} stopped in epoch {int(state['epoch']) + 1} after step "
                          f"{state['step']}; it resumes exactly only with the same data order, "
                          f"but {changed}: resume with the values it was started with")


def _upgrade(state: dict, world_size: int) -> dict:
    """A checkpoint of format v1 in today's form.

    v1 kept the epoch's L_sum so far - loss and penalty, averaged over processes - in the CBP
    state as ``epoch_sum``; today the CBP state keeps the penalty alone (``penalty_sum``) and the
    loss is only in ``loss_sum`` (summed over processes). The penalty is the difference.
    """
    if state.get("format") != FORMAT_V1 or state.get("cbp") is None:
        return state
    cbp = dict(state["cbp"])
    cbp.pop("epoch", None)
    penalty = cbp.pop("epoch_sum").double()
    if state.get("loss_sum") is not None:
        penalty = penalty - state["loss_sum"].double() / world_size
    return {**state, "cbp": {**cbp, "penalty_sum": penalty}}


def load_model(checkpoint: str) -> tuple[nn.Module, dict]:
    """Rebuild the (prepared, for CBP runs) model of a checkpoint; returns it and its meta."""
    state = load_run_checkpoint(checkpoint, training=False)
    meta = state["meta"]
    model = rebuild_model(meta)
    if meta["mode"] == "quantize":
        prepare(model, CBPConfig(levels=meta["factors"], include=meta["include"],
                                 exclude=meta["exclude"], skip_first_last=meta["skip_first_last"],
                                 scale=meta.get("scale", "per-layer")))
    _load_weights(model, state["model"], checkpoint)
    return model, meta


def _load_weights(model: nn.Module, tensors: dict, checkpoint: str) -> None:
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit its model: "
                              f"{load_error_reason(err)}") from err


def load_pretrained(checkpoint: str, num_classes: int, in_channels: int,
                    vocab: str | None = None) -> tuple[nn.Module, str]:
    """The float model of a finished pretraining checkpoint (for ``quantize --from``), and its name."""
    state = load_run_checkpoint(checkpoint, training=False)
    meta = state["meta"]
    if meta.get("mode") != "pretrain":
        raise CheckpointError(f"{checkpoint} is not a pretraining checkpoint")
    if state["epoch"] == 0:
        raise CheckpointError(f"{checkpoint} has not finished a pretraining epoch; "
                              "continue it with `cbp pretrain --resume` first")
    if (meta["num_classes"], meta["in_channels"]) != (num_classes, in_channels):
        raise CheckpointError(
            f"{checkpoint} is a {meta['num_classes']}-class, {meta['in_channels']}-channel "
            f"model; the data has {num_classes} classes and {in_channels} channels")
    if meta.get("vocab") != vocab:
        raise CheckpointError(f"{checkpoint} was trained on another vocabulary (text) than this "
                              "data's")
    model = rebuild_model(meta)
    _load_weights(model, state["model"], checkpoint)
    return model, meta["model"]
