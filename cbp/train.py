"""The training loop shared by pretraining and CBP: epochs, evaluation, logs, checkpoints, resume.

One plain loop: per epoch, ``steps`` batches (a full pass, or ``epoch_iters``), then the CBP
end-of-epoch rule (or the lr scheduler when pretraining), evaluation on the whole validation set,
a JSONL log row, a weight histogram of one layer, and an atomically written checkpoint (what they
hold: :mod:`cbp.runs`). With ``resume`` it continues from the last checkpoint exactly where the
run stopped.

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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from . import distributed, metrics
from .checkpoint import CheckpointError, remove_stale_temporaries, save_checkpoint
from .data import make_loader
from .distill import Distillation
from .distributed import Context, all_reduce_sum
from .interrupts import GracefulStop, Interrupted
from .lagrangian import Lagrangian
from .layers import quantized_layers
from .oscillation import OscillationTracker
from .run_state import load_run_checkpoint
from .runs import (
    CHECKPOINT_NAME,
    HIST_NAME,
    LOG_NAME,
    RUN_FILES,
    Position,
    append_row,
    checkpoint_state,
    histogram_layer,
    keep_rows_up_to,
    read_jsonl,
    restore_state,
    weight_histogram,
)
from .tasks import Classification


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
    task: type = Classification  # the loss and the validation metrics (cbp.tasks)
    # level flips and oscillations of the quantized weights, logged per epoch; fit creates one
    # for a prepared model unless track_oscillations is off
    oscillation: OscillationTracker | None = None
    track_oscillations: bool = True
    # a frozen teacher whose outputs the loss also matches (cbp.distill); None: the task loss only
    distillation: Distillation | None = None


def _to_device(run: Run, x: torch.Tensor) -> torch.Tensor:
    x = x.to(run.ctx.device, non_blocking=True)
    if run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


NAN_CHECK_EVERY = 20  # steps between loss checks where a check costs a sync or a collective
NAN_LR_FACTOR, NAN_RETRIES = 0.1, 3   # on_nan="lower-lr": lr factor per retry, retries at most


class NonFiniteError(FloatingPointError):
    """The loss or the weights became NaN or infinite; nothing was saved after the last good one."""


class _SkipBatches(Sampler):
    """A batch sampler without its first ``count`` batches: where a mid-epoch checkpoint resumes."""

    def __init__(self, batch_sampler: Sampler, count: int) -> None:
        self.batch_sampler, self.count = batch_sampler, count

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.count)


def _batches(loader: DataLoader, skip: int):
    """The epoch's batches after the first ``skip``, which are never loaded.

    The sampler's order depends only on seed and epoch, so these are the batches an uninterrupted
    run sees. Starting an iterator draws a seed from the global RNG; a mid-epoch resume puts the
    RNG back as the checkpoint had it, so random augmentation done in the main process
    (``workers=0``) continues exactly too; worker processes get fresh seeds.
    """
    if skip == 0:
        return iter(loader)
    rest = DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator)
    rng = torch.get_rng_state()
    batches = iter(rest)
    torch.set_rng_state(rng)
    return batches


def epoch_steps(run: Run, loader: DataLoader) -> int:
    """Steps of one epoch: a pass through the data, or ``epoch_iters`` (fewer or more)."""
    return len(loader) if run.epoch_iters is None or len(loader) == 0 else run.epoch_iters


def _epoch_batches(loader: DataLoader, epoch: int, steps: int, skip: int):
    """The batches of an epoch of ``steps`` steps after its first ``skip``.

    An epoch longer than one pass through the data (``epoch_iters`` > batches per pass, as in a
    long CBP epoch on a small data set) continues into fresh passes: pass ``p`` of epoch ``e``
    draws the sampler's permutation ``e * passes + p``, so an epoch of at most one pass keeps the
    order it always had (permutation ``e``) and no two passes of a run share a permutation.
    """
    passes = -(-steps // len(loader))
    first_pass, skip = divmod(skip, len(loader))
    for p in range(first_pass, passes):
        loader.sampler.set_epoch(epoch * passes + p)
        yield from _batches(loader, skip if p == first_pass else 0)


def _poll(ctx: Context, stop: GracefulStop | None, first_bad: torch.Tensor) -> tuple[int, int]:
    """``(signal number or 0, first step with a NaN/inf loss or -1)``, the same on every process."""
    signum = (stop.signum if stop is not None else None) or 0
    if ctx.world_size == 1:
        return signum, int(first_bad)
    flags = torch.stack([torch.tensor(signum, device=first_bad.device), first_bad])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    signum, bad = flags.tolist()
    return signum, bad


def train_epoch(run: Run, net: nn.Module, loader: DataLoader, epoch: int,
                start: Position | None = None, stop: GracefulStop | None = None) -> dict:
    """The steps of one epoch (from ``start.step`` on when resuming it); mean loss and steps.

    ``loss_sum`` is the epoch's loss summed over all processes, ``own_loss_sum`` this process's
    share of it (what ``Lagrangian.end_epoch`` takes). With distillation the loss is the mixed
    one, and ``loss_terms`` sums its two terms (task, divergence) over all processes.

    After a step in which ``stop`` caught a signal it returns early, ``stopped_at`` = steps done.
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
    for x, y in itertools.islice(_epoch_batches(loader, epoch, steps, first), steps - first):
        x, y = _to_device(run, x), y.to(ctx.device, non_blocking=True)
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
        if run.oscillation is not None:
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
            signum, bad = _poll(ctx, stop, first_bad)
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
    return {"loss": float(loss_sum / (step * ctx.world_size)), "steps": steps,
            "stopped_at": stopped_at, "signum": signum, "loss_sum": loss_sum,
            "own_loss_sum": own_loss_sum, "loss_terms": terms}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, ctx: Context, batch_size: int = 500,
             channels_last: bool = False) -> dict:
    """Top-1, top-5 (top-k for fewer classes) and loss over the whole of ``data``.

    Each process takes every ``world_size``-th sample, so the sums cover each sample exactly once.
    """
    model.eval()
    shard = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top1, top5, loss, n
    for x, y in DataLoader(shard, batch_size=batch_size):
        x, y = x.to(ctx.device), y.to(ctx.device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               F.cross_entropy(logits, y, reduction="sum"),
                               torch.tensor(len(y), device=ctx.device)]).double()
    top1, top5, loss, n = all_reduce_sum(totals).tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss / n}


def _plan(run: Run) -> dict:
    """What fixes the batches of an epoch: a mid-epoch checkpoint resumes exactly only with it."""
    return {"seed": run.seed, "batch_size": run.batch_size, "epoch_iters": run.epoch_iters,
            "train_samples": len(run.train_data)}


def _check_same_plan(run: Run, state: dict, source: str) -> None:
    """Refuse to resume a checkpoint taken mid-epoch with another seed, batch size or epoch
    length: the rest of the epoch would not be the batches the run skipped to."""
    saved, now = state.get("plan"), _plan(run)
    if not state.get("step") or saved is None or saved == now:
        return
    changed = ", ".join(f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in now
                        if saved.get(key) != now[key])
    raise CheckpointError(f"{source} stopped in epoch {int(state['epoch']) + 1} after step "
                          f"{state['step']}; it resumes exactly only with the same data order, "
                          f"but {changed}: resume with the values it was started with")


def _state(run: Run, pos: Position) -> dict:
    state = checkpoint_state(pos, run.meta, run.model, run.optimizer, run.lagrangian,
                             run.scheduler, run.oscillation)
    return {**state, "plan": _plan(run)}


def restore(run: Run, path: str) -> Position:
    """Load a checkpoint into ``run``; returns where it stands."""
    return _load_state(run, load_run_checkpoint(path, model=False), f"checkpoint {path}")


def _load_state(run: Run, state: dict, source: str) -> Position:
    _check_same_plan(run, state, source)
    return restore_state(state, source, run.meta, run.model, run.optimizer, run.lagrangian,
                         run.scheduler, run.ctx.world_size, run.oscillation)


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
        run.oscillation = OscillationTracker(run.model)
    os.makedirs(run.out_dir, exist_ok=True)
    ckpt_path = os.path.join(run.out_dir, CHECKPOINT_NAME)
    fresh = not (resume and os.path.exists(ckpt_path))
    loader = make_loader(run.train_data, run.batch_size, train=True, seed=run.seed,
                         world_size=ctx.world_size, rank=ctx.rank, num_workers=run.workers)
    if epoch_steps(run, loader) == 0:
        raise ValueError(f"no training step: {len(run.train_data)} training samples make no full "
                         f"batch of {run.batch_size}")
    if ctx.is_main:
        remove_stale_temporaries(run.out_dir, RUN_FILES)
    if fresh:
        pos = Position(0)
        if ctx.is_main:
            for name in RUN_FILES:
                if os.path.exists(os.path.join(run.out_dir, name)):
                    os.unlink(os.path.join(run.out_dir, name))
        distributed.barrier()
    else:
        pos = restore(run, ckpt_path)
    hist_layer = histogram_layer(run.model)
    if ctx.is_main:
        keep_rows_up_to(os.path.join(run.out_dir, LOG_NAME), pos.epoch)
        keep_rows_up_to(os.path.join(run.out_dir, HIST_NAME), pos.epoch)
        if hist_layer and fresh:
            append_row(os.path.join(run.out_dir, HIST_NAME),
                       weight_histogram(run.model, hist_layer, 0))

    net = run.model
    if ctx.world_size > 1:
        net = DistributedDataParallel(run.model, device_ids=[ctx.device.index] if
                                      ctx.device.type == "cuda" else None)
    if run.lagrangian is not None:
        run.lagrangian.plan((run.epochs - pos.epoch) * epoch_steps(run, loader) - pos.step)
    start = copy.deepcopy(_state(run, pos)) if run.on_nan == "lower-lr" and fresh else None
    with GracefulStop() as stop:
        for retry in range(NAN_RETRIES + 1):
            try:
                return _epochs(run, net, loader, pos, stop, hist_layer)
            except NonFiniteError as err:
                if run.on_nan != "lower-lr" or retry == NAN_RETRIES:
                    kept = (f"the last good checkpoint, {ckpt_path}, is untouched"
                            if os.path.exists(ckpt_path) else "no checkpoint was written")
                    raise NonFiniteError(f"{err}; {kept}") from None
                pos = (restore(run, ckpt_path) if os.path.exists(ckpt_path)
                       else _load_state(run, start, "the start of the run"))
                factor = NAN_LR_FACTOR ** (retry + 1)
                for group in run.optimizer.param_groups:
                    group["lr"] *= factor
                if ctx.is_main:
                    print(f"cbp: {err}; going back to epoch {pos.epoch}, step {pos.step} with the "
                          f"learning rate times {factor:g}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")  # pragma: no cover


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
    said = None
    for epoch in epochs:
        tic = time.perf_counter()
        stats = train_epoch(run, net, loader, epoch, pos if epoch == pos.epoch else None, stop)
        decision = run.lagrangian.penalty_pass if run.lagrangian is not None else None
        if decision != said and run.show_progress and ctx.is_main:
            said = decision
            epochs.write(f"cbp: penalty pass: {decision}")
        if not _finite(run.model):
            raise NonFiniteError(f"the weights became NaN or infinite in epoch {epoch + 1}")
        if stats["stopped_at"] is not None:
            _save(run, Position(epoch, stats["stopped_at"], stats["loss_sum"],
                                stats["loss_terms"] if run.distillation else None), ckpt_path)
            signum = stats["signum"]   # maybe another process's: the stop is collective
            raise Interrupted(f"stopped by {signal.Signals(signum).name} in epoch {epoch + 1} "
                              f"after step {stats['stopped_at']} of {stats['steps']}; "
                              f"{ckpt_path} holds that state: continue with --resume", signum)
        row = {"epoch": epoch + 1, "loss": stats["loss"], "steps": stats["steps"],
               "lr": run.optimizer.param_groups[0]["lr"]}
        if run.distillation is not None:   # the two terms of the loss, unweighted epoch means
            task, divergence = (stats["loss_terms"] / (stats["steps"] * ctx.world_size)).tolist()
            row.update(task_loss=task, distill_loss=divergence)
        if run.lagrangian is not None:
            end = run.lagrangian.end_epoch(stats["own_loss_sum"])
            row.update(lagrangian_sum=end.lagrangian_sum, g=end.g, updated=end.updated,
                       lr_dropped=end.lr_dropped)
            if run.lagrangian.multipliers:
                lams = torch.cat([lam.flatten() for lam in run.lagrangian.multipliers.values()])
                row.update(lambda_mean=float(lams.mean()), lambda_max=float(lams.max()))
            if hasattr(run.lagrangian, "epoch_stats"):   # the oscillation fixes of cbp.peers
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
        _save(run, Position(epoch + 1), ckpt_path)  # none reads it while rank 0 still writes it
        rows.append(row)
        if run.lagrangian is not None and run.lagrangian.finished:
            break
        # A signal that came during the epoch's end: the checkpoint just written holds it all.
        signum, _ = _poll(ctx, stop, torch.full((), -1, device=ctx.device))
        if signum and epoch + 1 < run.epochs:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}; "
                              f"{ckpt_path} holds that state: continue with --resume", signum)
    epochs.close()
    return rows
