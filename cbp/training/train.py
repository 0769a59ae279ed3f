"""The training loop shared by pretraining and CBP: epochs, evaluation, logs, checkpoints, resume.

One plain loop: per epoch, ``steps`` batches (a full pass, or ``epoch_iters``), then the CBP
end-of-epoch rule (or the lr scheduler when pretraining), evaluation on the whole validation set,
a JSONL log row, a weight histogram of one layer, and an atomically written checkpoint (what they
hold: :mod:`cbp.training.runs`; with ``checkpoint_every`` at most one per that many seconds). With
``resume`` it continues from the last checkpoint exactly where the run stopped.

SIGINT/SIGTERM stop it after the current step with a checkpoint of that step (epoch, step within
it, the epoch's loss sum so far; the sampler's order depends only on seed and epoch, so the rest
of the epoch is the same batches). A NaN/inf loss or weight stops it before anything bad is saved.
"""

from __future__ import annotations

import copy
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core import distributed, metrics
from ..core.distributed import Context, all_reduce_sum
from ..core.lagrangian import Lagrangian
from ..core.layers import quantized_layers
from ..core.oscillation import OscillationTracker
from ..files.checkpoint import save_checkpoint
from ..zoo.data import epoch_batches, make_loader
from ..zoo.tasks import Classification
from .distill import Distillation
from .interrupts import GracefulStop, Interrupted, poll
from .run_state import load_run_checkpoint
from .runs import (
    CHECKPOINT_NAME,
    HIST_NAME,
    LOG_NAME,
    Position,
    append_row,
    checkpoint_state,
    clear_run_dir,
    histogram_layer,
    read_jsonl,
    restore_state,
    trim_logs,
    weight_histogram,
)

evaluate = Classification.evaluate   # its name before cbp.zoo.tasks: benchmarks/compare.py, tests


@dataclass
class Run:
    """Everything one training run needs. ``lagrangian`` None means plain (pretraining) steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_data: Dataset
    val_data: Dataset
    out_dir: str
    epochs: int
    batch_size: int
    ctx: Context
    lagrangian: Lagrangian | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    epoch_iters: int | None = None
    seed: int = 0
    workers: int = 0
    channels_last: bool = False
    meta: dict = field(default_factory=dict)   # model/data/constraint identity, checked on resume
    show_progress: bool = True
    on_nan: str = "stop"      # or "lower-lr": back to the last checkpoint with a lower lr
    task: type = Classification  # the loss and the validation metrics (cbp.zoo.tasks)
    # level flips and oscillations of the quantized weights, logged per epoch; fit creates one
    # for a prepared model unless track_oscillations is off
    oscillation: OscillationTracker | None = None
    track_oscillations: bool = True
    # a frozen teacher whose outputs the loss also matches (cbp.training.distill); None: the task loss only
    distillation: Distillation | None = None
    # seconds of wall time between epoch-end checkpoints; 0: every epoch. The last epoch's, and
    # one where a signal stops the run, are always written (see _checkpoint_due)
    checkpoint_every: float = 0.0


NAN_CHECK_EVERY = 20  # steps between loss checks where a check costs a sync or a collective
NAN_LR_FACTOR, NAN_RETRIES = 0.1, 3   # on_nan="lower-lr": lr factor per retry, retries at most


class NonFiniteError(FloatingPointError):
    """The loss or the weights became NaN or infinite; nothing was saved after the last good one."""


@dataclass
class EpochResult:
    """What the steps of one epoch leave for its end (the log row, the CBP rule, a checkpoint)."""

    loss: float                 # mean loss of the steps done, over all processes
    steps: int                  # steps of the whole epoch
    loss_sum: torch.Tensor      # the loss summed over all processes (a mid-epoch checkpoint's)
    own_loss_sum: torch.Tensor  # this process's share of it: what Lagrangian.end_epoch takes
    loss_terms: torch.Tensor    # with distillation: its (task, divergence) sums, all processes
    stopped_at: int | None = None   # steps done when a signal stopped the epoch early
    signum: int = 0             # that signal (maybe another process's: the stop is collective)


def epoch_steps(run: Run, loader: DataLoader) -> int:
    """Steps of one epoch: a pass through the data, or ``epoch_iters`` (fewer or more)."""
    return len(loader) if run.epoch_iters is None or len(loader) == 0 else run.epoch_iters


def train_epoch(run: Run, net: nn.Module, loader: DataLoader, epoch: int,
                start: Position | None = None, stop: GracefulStop | None = None) -> EpochResult:
    """The steps of one epoch (from ``start.step`` on when resuming it). With distillation the
    loss is the mixed one. After a step in which ``stop`` caught a signal it returns early.

    A NaN/inf loss raises :class:`NonFiniteError` naming the step. Reading the flag that records
    it is free on CPU, so one process on CPU checks every step; on a GPU it is a device sync and
    across processes a collective, so there it is read every ``NAN_CHECK_EVERY`` steps and at the
    epoch's end (the flag, kept on the device, still names the exact step).
    """
    ctx = run.ctx
    net.train()
    steps = epoch_steps(run, loader)
    first = start.step if start is not None else 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    terms = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    if start is not None and ctx.is_main:   # the sums of the steps before the resume, all processes'
        if start.loss_sum is not None:
            loss_sum += start.loss_sum.to(ctx.device)
        if start.loss_terms is not None:
            terms += start.loss_terms.to(ctx.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=ctx.device)
    every = 1 if ctx.device.type == "cpu" and ctx.world_size == 1 else NAN_CHECK_EVERY
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}", leave=False, unit="step",
               disable=not (run.show_progress and ctx.is_main))
    step, stopped_at, signum = first, None, 0
    own_tracker = run.lagrangian.oscillation if run.lagrangian is not None else None  # it steps it
    for x, y in itertools.islice(epoch_batches(loader, epoch, steps, first), steps - first):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        run.optimizer.zero_grad(set_to_none=True)
        output = net(x)
        loss = run.task.loss(output, y)
        if run.distillation is not None:
            loss, parts = run.distillation(x, output, loss)
            terms += parts
        loss.backward()
        if run.lagrangian is None:
            run.optimizer.step()
        else:
            run.lagrangian.step()
        if run.oscillation is not None and run.oscillation is not own_tracker:
            run.oscillation.step()
        loss = loss.detach()
        loss_sum += loss
        first_bad = torch.where((first_bad < 0) & ~loss.isfinite(), step, first_bad)
        if step % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        step += 1
        bar.update()
        signalled = stop is not None and stop.signum is not None and ctx.world_size == 1
        if signalled or step % every == 0 or step == steps:
            signum, bad = poll(stop, first_bad, ctx.world_size)
            if bad >= 0:
                raise NonFiniteError(f"the loss became {float(loss_sum)} in epoch {epoch + 1} at "
                                     f"step {bad + 1}")
            if signum and step < steps:
                stopped_at = step
                break
    bar.close()
    own_loss_sum = loss_sum.clone()
    loss_sum = all_reduce_sum(loss_sum)
    if run.distillation is not None:
        terms = all_reduce_sum(terms)
    return EpochResult(float(loss_sum / (step * ctx.world_size)), steps, loss_sum, own_loss_sum,
                       terms, stopped_at, signum)


def _plan(run: Run) -> dict:
    """What fixes the batches of an epoch: a mid-epoch checkpoint resumes exactly only with it."""
    return {"seed": run.seed, "batch_size": run.batch_size, "epoch_iters": run.epoch_iters,
            "train_samples": len(run.train_data)}


def _state(run: Run, pos: Position) -> dict:
    return checkpoint_state(pos, run.meta, run.model, run.optimizer, run.lagrangian,
                            run.scheduler, run.oscillation, _plan(run))


def restore(run: Run, path: str) -> Position:
    """Load a checkpoint into ``run``; returns where it stands."""
    return _load_state(run, load_run_checkpoint(path, model=False), f"checkpoint {path}")


def _load_state(run: Run, state: dict, source: str) -> Position:
    return restore_state(state, source, run.meta, run.model, run.optimizer, run.lagrangian,
                         run.scheduler, run.ctx.world_size, run.oscillation, _plan(run))


def _checkpoint_due(run: Run, last_epoch: bool, since: float) -> bool:
    """Whether an epoch's end writes a checkpoint: always with ``checkpoint_every`` 0 and at the
    run's last epoch; else once ``checkpoint_every`` seconds have passed since the last one (or
    the start), as rank 0's clock says (a checkpoint is written by all processes or none).

    A checkpoint costs a fixed time (on a lent H200, ~0.1-0.3 s of an epoch end for ResNet-20:
    README › Speed), a large share of epochs of a second; skipping some costs nothing but the
    epochs a crash would repeat on ``--resume``.
    """
    if run.checkpoint_every <= 0 or last_epoch:
        return True
    due = torch.tensor(float(run.ctx.is_main and since >= run.checkpoint_every),
                       device=run.ctx.device)
    return bool(all_reduce_sum(due) > 0)


def _finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _save(run: Run, pos: Position, path: str) -> None:
    """Rank 0 writes the checkpoint; every process waits until it is complete."""
    if run.ctx.is_main:
        save_checkpoint(_state(run, pos), path)
    distributed.barrier()


def fit(run: Run, resume: bool = False) -> list[dict]:
    """Train for ``run.epochs`` epochs (or until the CBP schedule finishes); returns the log rows.

    A fresh run (``resume`` False, or no checkpoint yet) replaces any earlier run's files.
    SIGINT/SIGTERM end the run after the current step with a checkpoint of that step
    (:class:`Interrupted`). A NaN/inf loss ends it with :class:`NonFiniteError`, the last good
    checkpoint untouched; with ``run.on_nan == "lower-lr"`` the run goes back to that checkpoint
    (or to its start, kept in memory for this) instead, the learning rate times
    ``NAN_LR_FACTOR`` per retry, up to ``NAN_RETRIES`` times.
    """
    ctx = run.ctx
    if run.oscillation is None and run.track_oscillations and quantized_layers(run.model):
        run.oscillation = ((run.lagrangian.oscillation if run.lagrangian is not None else None)
                           or OscillationTracker(run.model))
    os.makedirs(run.out_dir, exist_ok=True)
    ckpt_path = os.path.join(run.out_dir, CHECKPOINT_NAME)
    fresh = not (resume and os.path.exists(ckpt_path))
    loader = make_loader(run.train_data, run.batch_size, train=True, seed=run.seed,
                         world_size=ctx.world_size, rank=ctx.rank, num_workers=run.workers)
    if epoch_steps(run, loader) == 0:
        raise ValueError(f"no training step: {len(run.train_data)} training samples make no full "
                         f"batch of {run.batch_size}")
    if ctx.is_main:
        clear_run_dir(run.out_dir, fresh)
    distributed.barrier()
    pos = Position(0) if fresh else restore(run, ckpt_path)
    hist_layer = histogram_layer(run.model)
    if ctx.is_main:
        trim_logs(run.out_dir, pos.epoch, run.model, hist_layer, fresh)

    net = run.model
    if ctx.world_size > 1:
        net = DistributedDataParallel(run.model, device_ids=[ctx.device.index] if
                                      ctx.device.type == "cuda" else None)
    if run.lagrangian is not None:
        run.lagrangian.plan((run.epochs - pos.epoch) * epoch_steps(run, loader) - pos.step)
    start = copy.deepcopy(_state(run, pos)) if run.on_nan == "lower-lr" and fresh else None
    with GracefulStop() as stop:
        return _retrying_nan(run, pos, start, ckpt_path,
                             lambda pos: _epochs(run, net, loader, pos, stop, hist_layer))


def _retrying_nan(run: Run, pos: Position, start: dict | None, ckpt_path: str,
                  epochs) -> list[dict]:
    """``epochs(pos)``; on a NaN/inf, with ``on_nan == "lower-lr"``, again from the last good
    checkpoint (or ``start``) with the learning rate times ``NAN_LR_FACTOR`` per retry."""
    retry = 0
    while True:
        try:
            return epochs(pos)
        except NonFiniteError as err:
            if run.on_nan != "lower-lr" or retry == NAN_RETRIES:
                kept = (f"the last good checkpoint, {ckpt_path}, is untouched"
                        if os.path.exists(ckpt_path) else "no checkpoint was written")
                raise NonFiniteError(f"{err}; {kept}") from None
            retry += 1
            pos = (restore(run, ckpt_path) if os.path.exists(ckpt_path)
                   else _load_state(run, start, "the start of the run"))
            if run.ctx.is_main:   # rows of epochs after it (checkpoint_every skips some) go
                trim_logs(run.out_dir, pos.epoch, run.model, histogram_layer(run.model), False)
            factor = NAN_LR_FACTOR ** retry
            for group in run.optimizer.param_groups:
                group["lr"] *= factor
            if run.ctx.is_main:
                print(f"cbp: {err}; going back to epoch {pos.epoch}, step {pos.step} with the "
                      f"learning rate times {factor:g}", file=sys.stderr, flush=True)


def _epochs(run: Run, net: nn.Module, loader: DataLoader, pos: Position, stop: GracefulStop,
            hist_layer: str | None) -> list[dict]:
    """The epochs from ``pos`` on; see :func:`fit`."""
    ctx = run.ctx
    log_path, hist_path, ckpt_path = (os.path.join(run.out_dir, n)
                                      for n in (LOG_NAME, HIST_NAME, CHECKPOINT_NAME))
    rows = read_jsonl(log_path) if ctx.is_main and os.path.exists(log_path) else []
    if run.lagrangian is not None and run.lagrangian.finished:
        return rows
    epochs = tqdm(range(pos.epoch, run.epochs), initial=pos.epoch, total=run.epochs,
                  desc="epochs", unit="epoch", disable=not (run.show_progress and ctx.is_main))
    said, saved_at = None, time.monotonic()
    for epoch in epochs:
        tic = time.perf_counter()
        done = train_epoch(run, net, loader, epoch, pos if epoch == pos.epoch else None, stop)
        decision = run.lagrangian.penalty_pass if run.lagrangian is not None else None
        if decision != said and run.show_progress and ctx.is_main:
            said = decision
            epochs.write(f"cbp: penalty pass: {decision}")
        if not _finite(run.model):
            raise NonFiniteError(f"the weights became NaN or infinite in epoch {epoch + 1}")
        if done.stopped_at is not None:
            _save(run, Position(epoch, done.stopped_at, done.loss_sum,
                                done.loss_terms if run.distillation else None), ckpt_path)
            raise Interrupted(f"stopped by {signal.Signals(done.signum).name} in epoch {epoch + 1} "
                              f"after step {done.stopped_at} of {done.steps}; "
                              f"{ckpt_path} holds that state: continue with --resume", done.signum)
        row = {"epoch": epoch + 1, "loss": done.loss, "steps": done.steps,
               "lr": run.optimizer.param_groups[0]["lr"]}
        if run.distillation is not None:   # the two terms of the loss, unweighted epoch means
            task, divergence = (done.loss_terms / (done.steps * ctx.world_size)).tolist()
            row.update(task_loss=task, distill_loss=divergence)
        if run.lagrangian is not None:
            end = run.lagrangian.end_epoch(done.own_loss_sum)
            row.update(lagrangian_sum=end.lagrangian_sum, g=end.g, updated=end.updated,
                       lr_dropped=end.lr_dropped)
            if run.lagrangian.multipliers:
                lams = torch.cat([lam.flatten() for lam in run.lagrangian.multipliers.values()])
                row.update(lambda_mean=float(lams.mean()), lambda_max=float(lams.max()))
            row.update(run.lagrangian.epoch_stats())
        if run.oscillation is not None:
            row.update(run.oscillation.epoch_stats())
        if run.scheduler is not None:
            run.scheduler.step()
        if quantized_layers(run.model):
            row.update(metrics.report(run.model))
        distributed.broadcast_buffers(run.model)  # all evaluate rank 0's BatchNorm statistics
        if distributed.debug_enabled():
            distributed.check_in_sync(run.model, run.optimizer, run.lagrangian, ctx.device)
        row.update(run.task.evaluate(run.model, run.val_data, ctx, channels_last=run.channels_last))
        row["seconds"] = time.perf_counter() - tic
        if ctx.is_main:
            append_row(log_path, row)
            if hist_layer:
                append_row(hist_path, weight_histogram(run.model, hist_layer, epoch + 1))
            shown = {run.task.headline: f"{row[run.task.headline]:.3f}"}
            epochs.set_postfix(**shown, **({"g": row["g"]} if "g" in row else {}))
        finished = run.lagrangian is not None and run.lagrangian.finished
        saved = _checkpoint_due(run, finished or epoch + 1 == run.epochs,
                                time.monotonic() - saved_at)
        if saved:
            _save(run, Position(epoch + 1), ckpt_path)  # none reads it while rank 0 still writes it
            saved_at = time.monotonic()
        rows.append(row)
        if finished:
            break
        # A signal that came during the epoch's end: a checkpoint of this epoch's end holds it all.
        signum, _ = poll(stop, torch.full((), -1, device=ctx.device), ctx.world_size)
        if signum and epoch + 1 < run.epochs:
            if not saved:
                _save(run, Position(epoch + 1), ckpt_path)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                              f"{ckpt_path} holds that state: continue with --resume", signum)
    epochs.close()
    return rows
