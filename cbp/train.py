"""The training loop shared by pretraining and CBP: epochs, evaluation, logs, checkpoints, resume.

One plain loop: per epoch, ``steps`` batches (a full pass, or ``epoch_iters``), then the CBP
end-of-epoch rule (or the lr scheduler when pretraining), evaluation on the whole validation set,
a JSONL log row, a weight histogram of one layer, and an atomically written checkpoint. With
``resume`` it continues from the last checkpoint exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed, metrics
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .data import make_loader
from .distributed import Context, all_reduce_sum
from .lagrangian import Lagrangian
from .layers import quantized_layers

LOG_NAME, HIST_NAME, CHECKPOINT_NAME = "log.jsonl", "histograms.jsonl", "checkpoint.pt"
HIST_RANGE, HIST_BINS = 1.6, 160  # histogram of w / scale over [-1.6, 1.6]


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


def _to_device(run: Run, x: torch.Tensor) -> torch.Tensor:
    x = x.to(run.ctx.device, non_blocking=True)
    if run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_epoch(run: Run, net: nn.Module, loader: DataLoader, epoch: int) -> dict:
    """One epoch of steps; returns the mean loss and the number of steps."""
    net.train()
    loader.sampler.set_epoch(epoch)
    steps = len(loader) if run.epoch_iters is None else min(run.epoch_iters, len(loader))
    loss_sum = torch.zeros((), device=run.ctx.device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", leave=False, unit="step",
               disable=not (run.show_progress and run.ctx.is_main))
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x, y = _to_device(run, x), y.to(run.ctx.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if run.lagrangian is None:
            run.optimizer.step()
        else:
            run.lagrangian.step(loss)
        loss_sum += loss.detach()
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return {"loss": float(all_reduce_sum(loss_sum) / (steps * run.ctx.world_size)),
            "steps": steps}


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


def _append_line(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _keep_rows_up_to(path: str, epoch: int) -> None:
    """Drop log rows written after the checkpoint a resumed run starts from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epoch]
    atomic_write(path, lambda f: f.writelines(rows), mode="w")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _state(run: Run, epoch: int) -> dict:
    return {
        "epoch": epoch, "meta": run.meta,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "cbp": run.lagrangian.state_dict() if run.lagrangian else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "rng": torch.get_rng_state(),
    }


def restore(run: Run, path: str) -> int:
    """Load a checkpoint into ``run``; returns the number of epochs already done."""
    state = load_checkpoint(path)
    for key in ("model", "dataset", "constraint", "factors", "mode"):
        if state["meta"].get(key) != run.meta.get(key):
            raise CheckpointError(f"checkpoint {path} is from another run ({key}: "
                                  f"{state['meta'].get(key)!r}, this run: {run.meta.get(key)!r})")
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.lagrangian is not None:
            run.lagrangian.load_state_dict(state["cbp"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{str(err).splitlines()[0]}") from err
    torch.set_rng_state(state["rng"])
    return int(state["epoch"])


def fit(run: Run, resume: bool = False) -> list[dict]:
    """Train for ``run.epochs`` epochs (or until the CBP schedule finishes); returns the log rows."""
    ctx = run.ctx
    os.makedirs(run.out_dir, exist_ok=True)
    log_path, hist_path = (os.path.join(run.out_dir, n) for n in (LOG_NAME, HIST_NAME))
    ckpt_path = os.path.join(run.out_dir, CHECKPOINT_NAME)
    start = 0
    if resume and os.path.exists(ckpt_path):
        start = restore(run, ckpt_path)
    elif ctx.is_main:
        for path in (log_path, hist_path):
            if os.path.exists(path):
                os.unlink(path)
    if ctx.is_main:
        _keep_rows_up_to(log_path, start)
        _keep_rows_up_to(hist_path, start)
    hist_layer = histogram_layer(run.model)
    if ctx.is_main and hist_layer and start == 0:
        _append_line(hist_path, weight_histogram(run.model, hist_layer, 0))

    net = run.model
    if ctx.world_size > 1:
        net = DistributedDataParallel(run.model, device_ids=[ctx.device.index] if
                                      ctx.device.type == "cuda" else None)
    loader = make_loader(run.train_data, run.batch_size, train=True, seed=run.seed,
                         world_size=ctx.world_size, rank=ctx.rank, num_workers=run.workers)
    rows = read_jsonl(log_path) if ctx.is_main and os.path.exists(log_path) else []
    if run.lagrangian is not None and run.lagrangian.finished:
        return rows
    epochs = tqdm(range(start, run.epochs), initial=start, total=run.epochs, desc="epochs",
                  unit="epoch", disable=not (run.show_progress and ctx.is_main))
    for epoch in epochs:
        tic = time.perf_counter()
        stats = train_epoch(run, net, loader, epoch)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"loss became {stats['loss']} in epoch {epoch + 1}; the last "
                                     f"good checkpoint is {ckpt_path}")
        row = {"epoch": epoch + 1, "loss": stats["loss"], "steps": stats["steps"],
               "lr": run.optimizer.param_groups[0]["lr"]}
        if run.lagrangian is not None:
            end = run.lagrangian.end_epoch()
            lams = torch.cat([lam.flatten() for lam in run.lagrangian.multipliers.values()])
            row.update(lagrangian_sum=end.lagrangian_sum, g=end.g, updated=end.updated,
                       lr_dropped=end.lr_dropped, lambda_mean=float(lams.mean()),
                       lambda_max=float(lams.max()))
        if run.scheduler is not None:
            run.scheduler.step()
        if quantized_layers(run.model):
            row.update(cfs=metrics.cfs(run.model), on_levels=metrics.fraction_on_levels(run.model))
        distributed.broadcast_buffers(run.model)  # all evaluate rank 0's BatchNorm statistics
        if distributed.debug_enabled():
            distributed.check_in_sync(run.model, run.optimizer, run.lagrangian, ctx.device)
        row.update(evaluate(run.model, run.val_data, ctx, channels_last=run.channels_last))
        row["seconds"] = time.perf_counter() - tic
        if ctx.is_main:
            _append_line(log_path, row)
            if hist_layer:
                _append_line(hist_path, weight_histogram(run.model, hist_layer, epoch + 1))
            save_checkpoint(_state(run, epoch + 1), ckpt_path)
            epochs.set_postfix(top1=f"{row['top1']:.2f}", **({"g": row["g"]} if "g" in row else {}))
        distributed.barrier()  # none reads the checkpoint while rank 0 still writes it
        rows.append(row)
        if run.lagrangian is not None and run.lagrangian.finished:
            break
    epochs.close()
    return rows
