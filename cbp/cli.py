"""Command-line interface: a thin layer over the library.

    cbp pretrain --model resnet20 --data fashion-mnist --out runs/fp
    cbp quantize --from runs/fp/checkpoint.pt --constraint binary --out runs/binary
    cbp evaluate runs/binary/checkpoint.pt
    cbp plot runs/binary
    cbp demo

    cbp pretrain --config gpt --out runs/gpt/pretrain        # character-level GPT, Shakespeare
    cbp quantize --config gpt --from runs/gpt/pretrain/checkpoint.pt --out runs/gpt/ternary
    cbp generate runs/gpt/ternary/checkpoint.pt --prompt "ROMEO:" --tokens 300 --seed 0

Flags mirror the paper's hyperparameters with its defaults (the CBP ones are CBPConfig's fields,
see ``cbp.options``); ``--config FILE.toml`` (or the name of a packaged config such as ``demo``)
sets the same keys, flags given on the command line win.
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
import time

import torch

from . import distributed, metrics, peers
from .baselines import recalibrate_bn, require_batch_norm
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .config import CBPConfig, check_number
from .data import check_same_classes, class_names, load_dataset, make_loader
from .distill import Distillation, file_sha256
from .export import export as export_packed
from .guards import check_run_dir, check_sources, lock_run_dir, recorded_settings, resume_settings
from .interrupts import Interrupted
from .lagrangian import Lagrangian
from .layers import param_groups, prepare
from .models import DEFAULT_SELECTION, build_model, generate
from .onnx_export import check_onnx, export_onnx
from .options import build_parsers, cbp_config, load_config, parse_args
from .plots import plot_run
from .runs import CHECKPOINT_NAME, LOG_NAME, describe, load_model, load_pretrained, read_jsonl
from .summary import summary
from .tasks import task_of
from .text import CharVocab
from .train import Run, evaluate, fit


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
                    list(train_data[0][0].shape), getattr(args, "constraint", None), config,
                    task.name, vocab)
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
              distillation=distillation)
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
    """CBP's Lagrangian, or the oscillation fix of ``--oscillation-fix`` (cbp.peers)."""
    per_epoch = args.epoch_iters or len(train_data) // args.batch_size   # full global batches
    return peers.build(args.oscillation_fix, model, config, optimizer,
                       total_steps=max(1, per_epoch * args.epochs))


def _recalibration_loader(data, batch_size: int, seed: int, batches: int):
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
    recalibrate_bn(run.model, _recalibration_loader(run.train_data, run.batch_size, run.seed,
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


def run_evaluate(args: argparse.Namespace) -> dict:
    ctx = distributed.setup(args.device)
    model, meta = load_model(args.checkpoint)
    if args.recalibrate_bn:
        require_batch_norm(model, "--recalibrate-bn")
    val_data, num_classes, in_channels = load_dataset(meta["dataset"], args.data_dir, False,
                                                      args.val_limit, args.image_size)
    if (num_classes, in_channels) != (meta["num_classes"], meta["in_channels"]):
        raise ValueError(f"{args.checkpoint} is a {meta['num_classes']}-class, "
                         f"{meta['in_channels']}-channel model; the data has {num_classes} "
                         f"classes and {in_channels} channels")
    task = task_of(meta)
    if task.vocab(val_data) != meta.get("vocab"):
        raise ValueError(f"{args.checkpoint} was trained on another vocabulary (text) than this data's")
    check_same_classes(meta.get("classes"), class_names(val_data), f"{args.data_dir}/val")
    result = task.evaluate(model.to(ctx.device), val_data, ctx)
    if args.recalibrate_bn:
        train_data, _, _ = load_dataset(meta["dataset"], args.data_dir, True, None, args.image_size)
        loader = _recalibration_loader(train_data, args.batch_size, args.seed, args.recalibrate_bn)
        recalibrate_bn(model, loader, args.recalibrate_bn)
        after = task.evaluate(model, val_data, ctx)
        result.update(top1_recalibrated=after["top1"], top5_recalibrated=after["top5"],
                      bn_gap=after["top1"] - result["top1"])
    if meta["mode"] == "quantize":
        result.update(metrics.report(model))
    if ctx.is_main:   # under torchrun every process holds the same full-set figures
        for key, value in result.items():
            print(f"{key:>10}  {value:.6g}")
    distributed.teardown()
    return result


def run_generate(args: argparse.Namespace) -> str:
    """Print ``--tokens`` characters sampled after ``--prompt``; the same seed, the same text."""
    model, meta = load_model(args.checkpoint)
    if not task_of(meta).can_generate:
        raise ValueError(f"{args.checkpoint} is not a language model; generate needs one")
    vocab = CharVocab(meta["vocab"])
    if not args.prompt:
        raise ValueError("--prompt must hold at least one character")
    prompt = vocab.encode(args.prompt)[None]
    text = vocab.decode(generate(model, prompt, args.tokens, seed=args.seed,
                                 temperature=args.temperature, top_k=args.top_k)[0])
    print(text)
    return text


def run_export(args: argparse.Namespace) -> None:
    model, meta = load_model(args.checkpoint)
    model.eval()
    path = export_packed(model, args.out)
    print(summary(model))
    print(f"\nwrote {path} ({os.path.getsize(path):,} bytes)")
    if args.onnx:
        example = task_of(meta).example_input(meta)
        export_onnx(model, args.onnx, example)
        error = check_onnx(args.onnx, model, example)
        print(f"wrote {args.onnx} (max |onnxruntime - torch| = {error:.2e})")


DEMO_BN_BATCHES = 50


def run_demo(args: argparse.Namespace) -> None:
    """Pretrain (cached) and quantize with the demo config; print the table."""
    tic = time.perf_counter()
    fp_dir, cbp_dir = os.path.join(args.out, "pretrain"), os.path.join(args.out, "binary")
    quiet = ["--quiet"] if args.quiet else []
    fp_ckpt = os.path.join(fp_dir, CHECKPOINT_NAME)
    if os.path.exists(fp_ckpt):
        print(f"pretrained model found in {fp_dir}; resuming/skipping pretraining")
    # --resume only where an earlier demo left a folder: a first run has nothing to resume
    resume = ["--resume"] if os.path.isdir(fp_dir) else []
    main_or_raise(["pretrain", "--config", args.config, "--out", fp_dir, *resume, *quiet])
    main_or_raise(["quantize", "--config", args.config, "--from", fp_ckpt, "--out", cbp_dir,
                   "--overwrite", *quiet])
    fp_rows, cbp_rows = (read_jsonl(os.path.join(d, LOG_NAME)) for d in (fp_dir, cbp_dir))
    fp_row, cbp_row = fp_rows[-1], cbp_rows[-1]
    # training time from the logs, so that a cached pretraining still shows what it took
    fp_minutes, cbp_minutes = (sum(r["seconds"] for r in rows) / 60 for rows in (fp_rows, cbp_rows))
    model, meta = load_model(os.path.join(cbp_dir, CHECKPOINT_NAME))
    # the quantize config may watch a validation subset per epoch; the table is the full test set
    settings = load_config(args.config, "quantize").training
    data_dir = settings["data_dir"]
    test_data, _, _ = load_dataset(meta["dataset"], data_dir, False)
    ctx = distributed.setup(settings.get("device"))   # where the config trained
    final = evaluate(model.to(ctx.device), test_data, ctx)
    train_data, _, _ = load_dataset(meta["dataset"], data_dir, True)
    bn_batches = min(DEMO_BN_BATCHES, len(train_data) // 128)   # fewer on a tiny data set
    recalibrate_bn(model, _recalibration_loader(train_data, 128, 0, bn_batches), bn_batches)
    recalibrated = evaluate(model, test_data, ctx)
    worst = max(s["mean_distance"] for s in metrics.layer_stats(model))
    table = [
        ("full-precision top-1 (%)", f"{fp_row['top1']:.2f}"),
        ("CBP binary top-1 (%), training BN statistics", f"{final['top1']:.2f}"),
        (f"CBP binary top-1 (%), BN re-estimated ({bn_batches} batches of 128)",
         f"{recalibrated['top1']:.2f}"),
        ("CBP binary top-5 (%)", f"{final['top5']:.2f}"),
        ("CFS (paper Eq. 19)", f"{cbp_row['cfs']:.2e}"),
        ("weights on a level (within 1% of a)", f"{100 * cbp_row['on_levels']:.2f}%"),
        ("worst layer mean |w - Q(w)| / a", f"{100 * worst:.2f}%"),
        ("final g / CBP epochs", f"{cbp_row['g']:g} / {cbp_row['epoch']}"),
        ("minutes (pretrain / CBP / this run)",
         f"{fp_minutes:.1f} / {cbp_minutes:.1f} / {(time.perf_counter() - tic) / 60:.1f}"),
    ]
    width = max(len(k) for k, _ in table)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in table))
    print(f"\nplots: {cbp_dir}/curves.png, {cbp_dir}/histograms.png, {fp_dir}/curves.png")


COMMANDS = {
    "pretrain": run_training, "quantize": run_training, "evaluate": run_evaluate,
    "export": run_export, "summary": lambda args: print(summary(load_model(args.checkpoint)[0])),
    "generate": run_generate,
    "plot": lambda args: print("\n".join(plot_run(args.run_dir))), "demo": run_demo,
}


def main_or_raise(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    if args.command is None:
        build_parsers(__doc__)[0].print_help()
        return
    COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes and bad files end in one line on stderr and a non-zero exit."""
    try:
        main_or_raise(argv)
    except Interrupted as stop:  # a checkpoint of the step it stopped at was written
        print(f"cbp: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("cbp: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"cbp: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
