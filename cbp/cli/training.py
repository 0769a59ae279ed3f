"""``cbp pretrain`` and ``cbp quantize``: from the parsed command line to a :class:`cbp.training.train.Run`.

The run directory's guards first (its lock, what it may replace or resume), then the data, the
model (``--from`` / ``--model --weights``), the optimizer, CBP's Lagrangian or the peer of
``--oscillation-fix``, distillation; then :func:`cbp.training.train.fit`, the plots, and the final
BatchNorm re-estimation (``--recalibrate-bn``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile

import torch

from ..core import distributed
from ..core.baselines import recalibrate_bn, require_batch_norm
from ..core.config import CBPConfig, check_number
from ..core.lagrangian import Lagrangian
from ..core.layers import param_groups, prepare
from ..files.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ..training import peers
from ..training.distill import Distillation, file_sha256
from ..training.plots import plot_run
from ..training.runs import CHECKPOINT_NAME, LOG_NAME, describe, load_pretrained, read_jsonl
from ..training.train import Run, evaluate, fit
from ..zoo.data import check_same_classes, class_names, load_dataset, make_loader
from ..zoo.models import DEFAULT_SELECTION, build_model
from ..zoo.tasks import task_of
from .guards import check_run_dir, check_sources, lock_run_dir, recorded_settings, resume_settings
from .options import cbp_config


def check_training_numbers(args: argparse.Namespace) -> None:
    """The optimizer's settings in range (CBP's own are :meth:`CBPConfig.validate`'s)."""
    check_number("--lr", args.lr, above=0, below=math.inf)
    check_number("--momentum", args.momentum, at_least=0, below=1)
    check_number("--weight-decay", args.weight_decay, at_least=0, below=math.inf)


def _pretrained_model(args, num_classes: int, in_channels: int,
                      vocab: str | None = None) -> tuple[torch.nn.Module, str]:
    """The model to quantize, from `--from CHECKPOINT` or `--model NAME --weights W`."""
    if args.from_checkpoint:
        return load_pretrained(args.from_checkpoint, num_classes, in_channels, vocab)
    if not args.model:
        raise ValueError("quantize needs --from CHECKPOINT or --model NAME (with --weights)")
    return build_model(args.model, num_classes, in_channels, args.weights), args.model


def model_selection(config: CBPConfig, model_name: str, args: argparse.Namespace) -> CBPConfig:
    """The model's own layer selection (a transformer's blocks) unless the user chose layers."""
    if model_name not in DEFAULT_SELECTION or args.include or not args.skip_first_last:
        return config
    return dataclasses.replace(config, **DEFAULT_SELECTION[model_name])


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.momentum, 0.99))
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def check_output_dir(path: str) -> None:
    """Fail now, not after hours of training, if the run directory cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"cannot write to the output directory {path}: "
                      f"{err.strerror or err}") from err


def run_training(args: argparse.Namespace) -> list[dict]:
    """`cbp pretrain` and `cbp quantize`, one run at a time in a directory (``--out``'s lock)."""
    check_output_dir(args.out)
    with lock_run_dir(args.out):
        return _train(args)


def _train(args: argparse.Namespace) -> list[dict]:
    """Build data, model, optimizer, then `train.fit`."""
    check_sources(args)
    resume = check_run_dir(args.out, args.resume, args.overwrite)
    if resume:
        for line in resume_settings(args, args._given):
            print(f"cbp: {line}", file=sys.stderr, flush=True)
    check_training_numbers(args)
    config = cbp_config(args) if args.command == "quantize" else None  # its mistakes first
    ctx = distributed.setup(args.device)
    train_data, num_classes, in_channels = load_dataset(
        args.data, args.data_dir, True, args.limit, args.image_size, args.download)
    val_data, _, _ = load_dataset(args.data, args.data_dir, False, args.val_limit,
                                  args.image_size, args.download)
    if args.command == "quantize" and args.recalibrate_bn > len(train_data) // args.batch_size:
        raise ValueError(f"--recalibrate-bn {args.recalibrate_bn}: the training set gives only "
                         f"{len(train_data) // args.batch_size} batches of {args.batch_size}")
    vocab = task_of({"dataset": args.data}).vocab(train_data)
    classes = class_names(train_data)
    check_same_classes(classes, class_names(val_data), f"{args.data_dir}/val")
    torch.manual_seed(args.seed)
    lagrangian = scheduler = distillation = None
    if args.command == "pretrain":
        model, model_name = build_model(args.model, num_classes, in_channels, args.weights), args.model
        task = task_of({"model": model_name, "dataset": args.data})
    else:
        model, model_name = _pretrained_model(args, num_classes, in_channels, vocab)
        task = task_of({"model": model_name, "dataset": args.data})
        config = model_selection(config, model_name, args)
        distillation, teacher_hash = _distillation(args, model, num_classes, in_channels, vocab)
        prepare(model, config)
        if args.recalibrate_bn:
            require_batch_norm(model, "--recalibrate-bn")
    meta = describe(args.command, model, model_name, args.data, num_classes, in_channels,
                    list(train_data[0][0].shape), config, task.name, vocab)
    if distillation is not None:   # a resume reloads the teacher by path: the same file?
        meta["teacher_sha256"] = teacher_hash
        distillation.teacher.to(ctx.device)
        if args.channels_last:
            distillation.teacher.to(memory_format=torch.channels_last)
    meta.update(settings=recorded_settings(args), **({"classes": classes} if classes else {}))
    if args.sync_bn:
        model = distributed.sync_batchnorm(model, ctx)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model)
    if args.command == "pretrain":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        lagrangian = _lagrangian(args, model, config, optimizer, train_data)
    run = Run(model=model, optimizer=optimizer, train_data=train_data, val_data=val_data,
              out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, ctx=ctx,
              lagrangian=lagrangian, scheduler=scheduler, epoch_iters=args.epoch_iters,
              seed=args.seed, workers=args.workers, channels_last=args.channels_last,
              meta=meta, show_progress=not args.quiet, on_nan=args.on_nan, task=task,
              distillation=distillation, checkpoint_every=args.checkpoint_every)
    rows = fit(run, resume=resume)
    if ctx.is_main and rows:   # the plots first: they show nothing the re-estimation changes
        plot_run(args.out)
    if args.command == "quantize" and args.recalibrate_bn and rows:
        recalibrate_run(run, args.recalibrate_bn, rows[-1]["top1"])
    distributed.teardown()
    return rows


def _distillation(args, model, num_classes: int, in_channels: int,
                  vocab: str | None) -> tuple[Distillation | None, str | None]:
    """``--distill``'s teacher and the SHA-256 of its file: ``--teacher``, else the float model
    quantizing starts from (``--from``, or ``--model --weights``: no file to hash then)."""
    if not args.distill:
        if args.teacher:
            raise ValueError("--teacher names the teacher of --distill: add --distill")
        return None, None
    check_number("--distill-alpha", args.distill_alpha, above=0, at_most=1)
    check_number("--distill-temperature", args.distill_temperature, above=0, below=math.inf)
    if args.teacher:
        teacher = load_pretrained(args.teacher, num_classes, in_channels, vocab)[0]
    else:
        teacher = copy.deepcopy(model)
    source = args.teacher or args.from_checkpoint or args.weights
    digest = file_sha256(source) if source and os.path.isfile(source) else None
    return Distillation(teacher, args.distill_alpha, args.distill_temperature), digest


def _lagrangian(args, model, config: CBPConfig, optimizer, train_data) -> Lagrangian:
    """CBP's Lagrangian, or the oscillation fix of ``--oscillation-fix`` (cbp.training.peers)."""
    per_epoch = args.epoch_iters or len(train_data) // args.batch_size   # full global batches
    return peers.build(args.oscillation_fix, model, config, optimizer,
                       total_steps=max(1, per_epoch * args.epochs))


def recalibration_loader(data, batch_size: int, seed: int, batches: int):
    """The training batches of a BatchNorm re-estimation; refuses more than the set gives."""
    loader = make_loader(data, batch_size, train=True, seed=seed)
    if len(loader) < batches:
        raise ValueError(f"--recalibrate-bn {batches}: the training set gives only {len(loader)} "
                         f"batches of {batch_size}")
    return loader


def recalibrate_run(run: Run, batches: int, top1_before: float) -> dict:
    """Re-estimate the final model's BatchNorm statistics; log, print and checkpoint the result.

    Every process computes the same statistics (same batches, same weights). The last row of
    ``log.jsonl`` gains ``top1_recalibrated`` and ``bn_gap`` (after minus before); the checkpoint's
    model gets the new statistics, so ``cbp export`` and ``cbp evaluate`` use them.
    """
    recalibrate_bn(run.model, recalibration_loader(run.train_data, run.batch_size, run.seed,
                                                    batches), batches)
    after = evaluate(run.model, run.val_data, run.ctx, channels_last=run.channels_last)
    result = {"top1_recalibrated": after["top1"], "bn_gap": after["top1"] - top1_before,
              "bn_batches": batches}
    if run.ctx.is_main:
        log_path, ckpt_path = (os.path.join(run.out_dir, n) for n in (LOG_NAME, CHECKPOINT_NAME))
        rows = read_jsonl(log_path)
        rows[-1].update(result)
        atomic_write(log_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows), mode="w")
        state = load_checkpoint(ckpt_path)
        state["model"] = run.model.state_dict()
        state["meta"]["bn_recalibrated"] = batches
        save_checkpoint(state, ckpt_path)
        print(f"top-1 {top1_before:.2f}% with the training BatchNorm statistics, "
              f"{after['top1']:.2f}% after re-estimating them on {batches} batches "
              f"(saved in {ckpt_path})")
    distributed.barrier()
    return result
