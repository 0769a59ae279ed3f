"""Command-line interface: a thin layer over the library.

    cbp pretrain --model resnet20 --data fashion-mnist --out runs/fp
    cbp quantize --from runs/fp/checkpoint.pt --constraint binary --out runs/binary
    cbp evaluate runs/binary/checkpoint.pt
    cbp plot runs/binary
    cbp demo

Flags mirror the paper's hyperparameters with its defaults; ``--config FILE.toml`` (or the name of
a packaged config such as ``demo``) sets the same keys, flags given on the command line win.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from importlib import resources

import torch

from . import distributed, metrics
from .config import CBPConfig, SettingError, check_number
from .data import DATASET_NAMES, check_same_classes, class_names, load_dataset
from .export import check_onnx, export_onnx, summary
from .export import export as export_packed
from .guards import check_run_dir, recorded_settings, resume_settings
from .interrupts import Interrupted
from .lagrangian import Lagrangian
from .layers import param_groups, prepare
from .levels import LEVEL_SETS
from .models import MODEL_NAMES, build_model, model_options
from .plots import plot_run
from .runs import CHECKPOINT_NAME, LOG_NAME, describe, load_model, load_pretrained, read_jsonl
from .train import Run, evaluate, fit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONSTRAINTS = (*LEVEL_SETS, "custom")


def _optional_float(text: str) -> float | None:
    """A float, or None for "none"/"off" (switches a reference extra off); "inf" is infinity."""
    return None if text.lower() in ("none", "off") else float(text)


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (sizes and counts; 0 or less is a mistake)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return integer


def _common(p: argparse.ArgumentParser, *, lr: float, weight_decay: float, batch_size: int,
            epochs: int) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASET_NAMES, default="fashion-mnist")
    g.add_argument("--data-dir", help="dataset folder (Fashion-MNIST IDX files, or train/ and val/)")
    g.add_argument("--download", action="store_true", help="fetch Fashion-MNIST if it is missing")
    g.add_argument("--limit", type=_at_least(1), help="use only this many training images")
    g.add_argument("--val-limit", type=_at_least(1), help="use only this many validation images")
    g.add_argument("--image-size", type=_at_least(1), default=224,
                   help="crop size for image folders")
    g.add_argument("--workers", type=_at_least(0), default=0, help="data-loading processes")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_at_least(1), default=epochs)
    g.add_argument("--epoch-iters", type=_at_least(1),
                   help="steps per epoch (default: a full pass)")
    g.add_argument("--batch-size", type=_at_least(1), default=batch_size, help="global batch size")
    g.add_argument("--lr", type=float, default=lr, help="weight learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="on Conv/Linear weights only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over all processes (GPU only; default: per process)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (faster convolutions on CPU)")
    g.add_argument("--out", required=True, help="run directory: log, checkpoint, plots")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT holds a run (its files are replaced)")
    g.add_argument("--on-nan", choices=("stop", "lower-lr"), default="stop",
                   help="when the loss becomes NaN/inf: stop, or go back to the last checkpoint "
                        "with the learning rate times 0.1 (at most 3 times)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--config", help="TOML file (or packaged config name) with the same keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="plain full-precision training; saves a checkpoint")
    p.add_argument("--model", choices=MODEL_NAMES, default="resnet20")
    p.add_argument("--weights", help="start from 'torchvision' weights (the paper's), "
                   "'torchvision:MEMBER' (e.g. torchvision:IMAGENET1K_V2) or a local file")
    _common(p, lr=0.1, weight_decay=5e-4, batch_size=128, epochs=10)

    p = sub.add_parser("quantize", help="CBP from a pretrained checkpoint")
    src = p.add_argument_group("pretrained model (one of)")
    src.add_argument("--from", dest="from_checkpoint", help="checkpoint of `cbp pretrain`")
    src.add_argument("--model", choices=MODEL_NAMES, help="model name, with --weights")
    src.add_argument("--weights", help="'torchvision' (the paper's published weights), "
                     "'torchvision:MEMBER' or a local weights file")
    c = p.add_argument_group("CBP (defaults: the paper's)")
    c.add_argument("--constraint", choices=CONSTRAINTS, default="binary")
    c.add_argument("--levels", help="custom level factors, comma separated, e.g. -1,-0.5,0,0.5,1")
    c.add_argument("--multiplier-lr", type=float, default=1e-4, help="eta_lambda")
    c.add_argument("--multiplier-rule", choices=("adam", "plain"), default="adam")
    c.add_argument("--p-max", type=int, default=20)
    c.add_argument("--g-init", type=float, default=1.0, help="'inf': no window (ablation)")
    c.add_argument("--g-final", type=_optional_float, help="stop once g passes this")
    c.add_argument("--lr-drop-at-g", type=_optional_float, default=20.0)
    c.add_argument("--lr-drop-factor", type=float, default=0.1)
    c.add_argument("--grad-clip", type=_optional_float, default=1.0, help="'none' to switch off")
    c.add_argument("--weight-clamp", type=_optional_float, default=1.0, help="'none' to switch off")
    c.add_argument("--no-constraint", action="store_true", help="STE-only fine-tuning baseline")
    c.add_argument("--no-initial-update", action="store_true",
                   help="skip the reference's lambda update right after initialisation")
    c.add_argument("--include", nargs="*", default=[], help="regexes of layer names to quantize")
    c.add_argument("--exclude", nargs="*", default=[], help="regexes of layer names to skip")
    c.add_argument("--quantize-first-last", action="store_true",
                   help="also quantize the first and last Conv/Linear layers")
    _common(p, lr=1e-3, weight_decay=1e-4, batch_size=256, epochs=1000)

    p = sub.add_parser("evaluate", help="top-1/top-5 and CFS of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--val-limit", type=_at_least(1))
    p.add_argument("--image-size", type=_at_least(1), default=224)
    p.add_argument("--device")

    p = sub.add_parser("export", help="bit-packed safetensors file of a CBP checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--onnx", help="also write an ONNX file here, checked against PyTorch")

    p = sub.add_parser("summary", help="per-layer bits, bytes and compression of a checkpoint")
    p.add_argument("checkpoint")

    p = sub.add_parser("plot", help="write curves.png and histograms.png of a run directory")
    p.add_argument("run_dir")

    p = sub.add_parser("demo", help="Fashion-MNIST: pretrain ResNet-20, CBP binary, table, plots")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default="demo")
    p.add_argument("--quiet", action="store_true")
    return parser


def read_config(name: str, section: str) -> dict:
    """Keys of a TOML config (its ``[section]`` table if present), as argparse destinations."""
    if os.path.exists(name):
        text = open(name, "rb").read()
    else:
        packaged = resources.files("cbp") / "configs" / f"{name}.toml"
        if not packaged.is_file():
            raise ValueError(f"config {name!r} is neither a file nor a packaged config")
        text = packaged.read_bytes()
    try:
        data = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config {name} is not valid TOML: {err}") from err
    table = data.get(section, data)
    return {k.replace("-", "_"): v for k, v in table.items() if not isinstance(v, dict)}


def config_argv(values: dict, sub: argparse.ArgumentParser, name: str) -> list[str]:
    """A config's keys as command-line tokens.

    Placed before the user's own flags, they pass argparse's type and choice checks like any
    flag, and a flag given on the command line wins. Keys are destinations or option names.
    """
    actions = {}
    for action in sub._actions:
        if action.dest not in ("help", "config"):
            names = [opt[2:] for opt in action.option_strings if opt.startswith("--")]
            actions.update({k.replace("-", "_"): action for k in (action.dest, *names)})
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"config {name}: unknown key(s) {', '.join(unknown)}")
    tokens = []
    for key, value in values.items():
        action = actions[key]
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"config {name}: {key} must be true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                tokens.append(flag)
        elif isinstance(value, list):
            if action.nargs not in ("*", "+"):
                raise ValueError(f"config {name}: {key} takes one value, not a list")
            tokens += [flag, *map(str, value)]
        else:
            tokens.append(f"{flag}={value}")
    return tokens


_NUMBER_LIST = re.compile(r"^-[^-].*,")  # "-1,0,1", "-inf,1": no option holds a comma


def _negative_value(token: str) -> bool:
    """A negative number or a list starting with one: "-1,0,1", "-1e-4", "-inf"."""
    try:
        float(token)
    except ValueError:
        return bool(_NUMBER_LIST.match(token))
    return token.startswith("-")


def _glue_number_lists(argv: list[str]) -> list[str]:
    """``--levels -1,0,1`` as ``--levels=-1,0,1`` (and ``--weight-decay -1e-4``): argparse takes
    "-1,0,1" or "-1e-4" for an option, and would report a missing value instead of checking it."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _negative_value(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = _glue_number_lists(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and args.command in ("pretrain", "quantize"):
        sub = parser._subparsers._group_actions[0].choices[args.command]
        tokens = config_argv(read_config(args.config, args.command), sub, args.config)
        at = argv.index(args.command) + 1
        argv = argv[:at] + tokens + argv[at:]
        args = parser.parse_args(argv)
    if args.command in ("pretrain", "quantize"):
        args._given = _given_settings(argv)
    return args


def _given_settings(argv: list[str]) -> set[str]:
    """The settings ``argv`` (with ``--config``'s keys in it) sets, as opposed to defaults."""
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def check_training_numbers(args: argparse.Namespace) -> None:
    """The optimizer's settings in range (CBP's own are :meth:`CBPConfig.validate`'s)."""
    check_number("--lr", args.lr, above=0, below=math.inf)
    check_number("--momentum", args.momentum, at_least=0, below=1)
    check_number("--weight-decay", args.weight_decay, at_least=0, below=math.inf)


FLAG_OF_FIELD = {"grad_clip_value": "--grad-clip"}   # CBPConfig fields whose flag is not --<field>


def cbp_config(args: argparse.Namespace) -> CBPConfig:
    if args.constraint == "custom":
        if not args.levels:
            raise ValueError("--constraint custom needs --levels, e.g. --levels -1,0,1")
        try:
            levels = [float(x) for x in args.levels.split(",")]
        except ValueError as err:
            raise ValueError(f"--levels must be comma-separated numbers, got {args.levels!r}") from err
    elif args.levels:
        raise ValueError(f"--levels needs --constraint custom (the constraint is {args.constraint})")
    else:
        levels = args.constraint
    for pattern in (*args.include, *args.exclude):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--include/--exclude: {pattern!r} is not a regular expression: "
                             f"{err}") from err
    try:
        return CBPConfig(
            levels=levels, include=args.include, exclude=args.exclude,
            skip_first_last=not args.quantize_first_last, use_constraint=not args.no_constraint,
            multiplier_lr=args.multiplier_lr, multiplier_rule=args.multiplier_rule,
            initial_multiplier_update=not args.no_initial_update, p_max=args.p_max,
            g_init=args.g_init, g_final=args.g_final, lr_drop_at_g=args.lr_drop_at_g,
            lr_drop_factor=args.lr_drop_factor, grad_clip_value=args.grad_clip,
            weight_clamp=args.weight_clamp)
    except SettingError as err:   # CBPConfig's check, in the words of the command line
        flag = FLAG_OF_FIELD.get(err.name, "--" + err.name.replace("_", "-"))
        raise ValueError(f"{flag} {err.requirement}") from None


def _pretrained_model(args, num_classes: int, in_channels: int) -> tuple[torch.nn.Module, str]:
    """The model to quantize, from `--from CHECKPOINT` or `--model NAME --weights W`."""
    if args.from_checkpoint:
        return load_pretrained(args.from_checkpoint, num_classes, in_channels)
    if not args.model:
        raise ValueError("quantize needs --from CHECKPOINT or --model NAME (with --weights)")
    return build_model(args.model, num_classes, in_channels, args.weights), args.model


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
    """`cbp pretrain` and `cbp quantize`: build data, model, optimizer, then `train.fit`."""
    check_output_dir(args.out)
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
    classes = class_names(train_data)
    check_same_classes(classes, class_names(val_data), f"{args.data_dir}/val")
    torch.manual_seed(args.seed)
    lagrangian = scheduler = None
    if args.command == "pretrain":
        model, model_name = build_model(args.model, num_classes, in_channels, args.weights), args.model
    else:
        model, model_name = _pretrained_model(args, num_classes, in_channels)
        prepare(model, config)
    meta = describe(args.command, model_name, args.data, num_classes, in_channels,
                    list(train_data[0][0].shape), getattr(args, "constraint", None), config)
    meta.update(settings=recorded_settings(args), **({"classes": classes} if classes else {}))
    meta["model_options"] = model_options(model)  # what rebuild_model needs besides the weights
    if args.sync_bn:
        model = distributed.sync_batchnorm(model, ctx)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr,
                                momentum=args.momentum)
    if args.command == "pretrain":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        lagrangian = Lagrangian(model, config, optimizer)
    run = Run(model=model, optimizer=optimizer, train_data=train_data, val_data=val_data,
              out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, ctx=ctx,
              lagrangian=lagrangian, scheduler=scheduler, epoch_iters=args.epoch_iters,
              seed=args.seed, workers=args.workers, channels_last=args.channels_last,
              meta=meta, show_progress=not args.quiet, on_nan=args.on_nan)
    rows = fit(run, resume=resume)
    if ctx.is_main and rows:
        plot_run(args.out)
    distributed.teardown()
    return rows


def run_evaluate(args: argparse.Namespace) -> dict:
    ctx = distributed.setup(args.device)
    model, meta = load_model(args.checkpoint)
    val_data, num_classes, in_channels = load_dataset(meta["dataset"], args.data_dir, False,
                                                      args.val_limit, args.image_size)
    if (num_classes, in_channels) != (meta["num_classes"], meta["in_channels"]):
        raise ValueError(f"{args.checkpoint} is a {meta['num_classes']}-class, "
                         f"{meta['in_channels']}-channel model; the data has {num_classes} "
                         f"classes and {in_channels} channels")
    check_same_classes(meta.get("classes"), class_names(val_data), f"{args.data_dir}/val")
    result = evaluate(model.to(ctx.device), val_data, ctx)
    if meta["mode"] == "quantize":
        result.update(cfs=metrics.cfs(model), on_levels=metrics.fraction_on_levels(model))
    if ctx.is_main:   # under torchrun every process holds the same full-set figures
        for key, value in result.items():
            print(f"{key:>10}  {value:.6g}")
    distributed.teardown()
    return result


def run_export(args: argparse.Namespace) -> None:
    model, meta = load_model(args.checkpoint)
    model.eval()
    path = export_packed(model, args.out)
    print(summary(model))
    print(f"\nwrote {path} ({os.path.getsize(path):,} bytes)")
    if args.onnx:
        example = torch.randn(2, *meta["input_size"])
        export_onnx(model, args.onnx, example)
        error = check_onnx(args.onnx, model, example)
        print(f"wrote {args.onnx} (max |onnxruntime - torch| = {error:.2e})")


def run_demo(args: argparse.Namespace) -> None:
    """Pretrain (cached) and quantize with the demo config; print the table."""
    tic = time.perf_counter()
    fp_dir, cbp_dir = os.path.join(args.out, "pretrain"), os.path.join(args.out, "binary")
    quiet = ["--quiet"] if args.quiet else []
    fp_ckpt = os.path.join(fp_dir, CHECKPOINT_NAME)
    if os.path.exists(fp_ckpt):
        print(f"pretrained model found in {fp_dir}; resuming/skipping pretraining")
    main_or_raise(["pretrain", "--config", args.config, "--out", fp_dir, "--resume", *quiet])
    main_or_raise(["quantize", "--config", args.config, "--from", fp_ckpt, "--out", cbp_dir,
                   "--overwrite", *quiet])
    fp_rows, cbp_rows = (read_jsonl(os.path.join(d, LOG_NAME)) for d in (fp_dir, cbp_dir))
    fp_row, cbp_row = fp_rows[-1], cbp_rows[-1]
    # training time from the logs, so that a cached pretraining still shows what it took
    fp_minutes, cbp_minutes = (sum(r["seconds"] for r in rows) / 60 for rows in (fp_rows, cbp_rows))
    model, meta = load_model(os.path.join(cbp_dir, CHECKPOINT_NAME))
    # the quantize config may watch a validation subset per epoch; the table is the full test set
    data_dir = read_config(args.config, "quantize").get("data_dir")
    test_data, _, _ = load_dataset(meta["dataset"], data_dir, False)
    ctx = distributed.setup(None)
    final = evaluate(model.to(ctx.device), test_data, ctx)
    worst = max(s["mean_distance"] for s in metrics.layer_stats(model))
    table = [
        ("full-precision top-1 (%)", f"{fp_row['top1']:.2f}"),
        ("CBP binary top-1 (%)", f"{final['top1']:.2f}"),
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
    "plot": lambda args: print("\n".join(plot_run(args.run_dir))), "demo": run_demo,
}


def main_or_raise(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command is None:
        build_parser().print_help()
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
