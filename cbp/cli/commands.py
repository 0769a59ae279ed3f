"""Command-line interface: a thin layer over the library.

    cbp pretrain --model resnet20 --data fashion-mnist --out runs/fp
    cbp quantize --from runs/fp/checkpoint.pt --levels binary --out runs/binary
    cbp evaluate runs/binary/checkpoint.pt
    cbp plot runs/binary
    cbp demo

    cbp pretrain --config gpt --out runs/gpt/pretrain        # character-level GPT, Shakespeare
    cbp quantize --config gpt --from runs/gpt/pretrain/checkpoint.pt --out runs/gpt/ternary
    cbp generate runs/gpt/ternary/checkpoint.pt --prompt "ROMEO:" --tokens 300 --seed 0

Flags mirror the paper's hyperparameters with its defaults (the CBP ones are CBPConfig's fields,
see ``cbp.cli.options``); ``--config FILE.toml`` (or the name of a packaged config such as ``demo``)
sets the same keys, flags given on the command line win.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..core import distributed, metrics
from ..core.baselines import recalibrate_bn, require_batch_norm
from ..files.export import export as export_packed
from ..files.onnx_export import check_onnx, export_onnx
from ..files.summary import summary
from ..training.interrupts import Interrupted
from ..training.plots import plot_run
from ..training.runs import CHECKPOINT_NAME, LOG_NAME, load_model, read_jsonl
from ..training.train import evaluate
from ..zoo.data import check_same_classes, class_names, load_dataset
from ..zoo.models import generate
from ..zoo.tasks import task_of
from ..zoo.text import CharVocab
from .options import build_parsers, load_config, parse_args
from .training import recalibration_loader, run_training


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
        loader = recalibration_loader(train_data, args.batch_size, args.seed, args.recalibrate_bn)
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
                                 temperature=args.temperature, top_k=args.top_k,
                                 context_shift=args.context_shift)[0])
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
    recalibrate_bn(model, recalibration_loader(train_data, 128, 0, bn_batches), bn_batches)
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
