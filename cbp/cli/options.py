"""The command line's options and config files: one set of names and defaults.

The CBP flags of ``cbp quantize`` are made from ``dataclasses.fields(CBPConfig)``: a field
``multiplier_lr`` is the flag ``--multiplier-lr``, with the field's default and its documentation
as help, so a new field is a new flag. A TOML config (a file, or the name of a packaged one such
as ``demo`` or ``paper/resnet50-binary``) sets the same settings - its keys are the flags' names
(``multiplier_lr`` or ``multiplier-lr``) - and flags on the command line win (:func:`parse_args`).
``cbp quantize --recipe NAME`` is a packaged config of ``configs/recipes/`` that chooses a method
(``best``: what measured closest to full precision); a ``--config`` beside it wins over it.
:func:`load_config` gives a library user what the CLI would run with.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, fields

from ..core.config import CBPConfig, SettingError
from ..core.levels import LEVEL_SETS
from ..training.distill import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
from ..training.peers import OSCILLATION_FIXES
from ..zoo.data import DATASET_NAMES
from ..zoo.models import MODEL_NAMES
from .flags import (
    RECIPES,
    TABLES,
    Flags,
    at_least,
    increments,
    optional_float,
    random_seed,
    read_config,
    temperature,
)

CONSTRAINTS = (*LEVEL_SETS, "custom")

# A CBPConfig field's annotation -> how its flag reads a value.
_KINDS = {
    "bool": {"action": argparse.BooleanOptionalAction},
    "bool | None": {"action": argparse.BooleanOptionalAction},
    "int": {"type": int},
    "float": {"type": float},
    "float | None": {"type": optional_float},
    "str": {},
    "Sequence[str]": {"nargs": "*"},
    "Sequence[tuple[float, float]]": {"type": increments},
}


def cbp_fields() -> list:
    """The CBPConfig fields that are flags made from their field (``levels`` has its own)."""
    return [f for f in fields(CBPConfig) if f.init and f.metadata.get("flag", True)]


# ---- the parser ----------------------------------------------------------------------------------

def _add_cbp_flags(flags: Flags, group) -> None:
    """``--levels`` (and its old spelling ``--constraint``), then one flag per CBPConfig field."""
    flags.add(group, "--levels", default="binary",
              help=f"the level set: {', '.join(LEVEL_SETS)}, or custom level factors, comma "
                   "separated, e.g. -1,-0.5,0,0.5,1 (default: %(default)s)")
    flags.add(group, "--constraint", choices=CONSTRAINTS, default=argparse.SUPPRESS,
              help="the old spelling of --levels NAME (custom: the factors are --levels')")
    for f in cbp_fields():
        if f.type not in _KINDS:
            raise TypeError(f"CBPConfig.{f.name}: no command-line form for {f.type!r}; add one to "
                            "cbp.cli.options._KINDS or give the field flag=False")
        kind = dict(_KINDS[f.type])
        flag = "--" + f.name.replace("_", "-")
        aliases = f.metadata.get("aliases", ())
        doc = f.metadata["help"]
        if kind.get("action") is argparse.BooleanOptionalAction:
            flags.add(group, flag, default=f.default, **kind,
                      help=doc + (f" ({', '.join(aliases)} is --no-{flag[2:]})" if aliases else ""))
            for alias in aliases:   # an old switch meaning the opposite of the default
                flags.add(group, alias, dest=f.name, action="store_const", const=not f.default,
                          default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if kind.get("nargs"):
            default, shown = list(f.default), ""
        elif f.name == "g_increments":
            default, shown = f.default, ",".join(f"{b:g}:{i:g}" for b, i in f.default)
        else:
            default, shown = f.default, "none" if f.default is None else str(f.default)
        flags.add(group, flag, *aliases, dest=f.name, default=default,
                  choices=f.metadata.get("choices"), **kind,
                  help=f"{doc} (default: {shown})" if shown else doc)


def _common(flags: Flags, *, lr: float, weight_decay: float, batch_size: int, epochs: int) -> None:
    p = flags.parser
    g = p.add_argument_group("data")
    flags.add(g, "--data", choices=DATASET_NAMES, default="fashion-mnist")
    flags.add(g, "--data-dir", help="dataset folder (Fashion-MNIST IDX files, or train/ and val/)")
    flags.add(g, "--download", action="store_true", help="fetch Fashion-MNIST if it is missing")
    flags.add(g, "--limit", type=at_least(1), help="use only this many training images")
    flags.add(g, "--val-limit", type=at_least(1), help="use only this many validation images")
    flags.add(g, "--image-size", type=at_least(1), default=224,
              help="crop size for image folders")
    flags.add(g, "--workers", type=at_least(0), default=0, help="data-loading processes")
    g = p.add_argument_group("training")
    flags.add(g, "--epochs", type=at_least(1), default=epochs)
    flags.add(g, "--epoch-iters", type=at_least(1),
              help="steps per epoch (default: a full pass; more than a pass continues into fresh "
              "passes); CBP's end-of-epoch rule runs after each")
    flags.add(g, "--batch-size", type=at_least(1), default=batch_size, help="global batch size")
    flags.add(g, "--lr", type=float, default=lr, help="weight learning rate")
    flags.add(g, "--optimizer", choices=("sgd", "adamw"), default="sgd",
              help="of the weights: SGD with momentum (the paper's), or AdamW (transformers)")
    flags.add(g, "--momentum", type=float, default=0.9)
    flags.add(g, "--weight-decay", type=float, default=weight_decay,
              help="on Conv/Linear weights only")
    flags.add(g, "--seed", type=random_seed, default=0)
    flags.add(g, "--device", help="cpu or cuda (default: cuda when available)")
    flags.add(g, "--sync-bn", action="store_true",
              help="BatchNorm statistics over all processes (GPU only; default: per process)")
    flags.add(g, "--channels-last", action=argparse.BooleanOptionalAction, default=True,
              help="channels-last memory format (faster convolutions on CPU)")
    flags.add(g, "--out", required=True, help="run directory: log, checkpoint, plots")
    flags.add(g, "--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    flags.add(g, "--overwrite", action="store_true",
              help="start afresh even if OUT holds a run (its files are replaced)")
    flags.add(g, "--on-nan", choices=("stop", "lower-lr"), default="stop",
              help="when the loss becomes NaN/inf: stop, or go back to the last checkpoint "
                   "with the learning rate times 0.1 (at most 3 times)")
    flags.add(g, "--checkpoint-every", type=at_least(0), default=0, metavar="SECONDS",
              help="write an epoch's end checkpoint only once SECONDS have passed since the last "
                   "(the last epoch's and a stopped run's always): for epochs of a second or two, "
                   "where a checkpoint is a large share; 0 (default): every epoch")
    flags.add(g, "--quiet", action="store_true", help="no progress bars")
    flags.add(g, "--config", help="TOML file (or packaged config name) with the same keys")


def build_parsers(description: str = "") -> tuple[argparse.ArgumentParser, dict[str, Flags]]:
    """The ``cbp`` parser, and the flags of the commands a config file may configure."""
    parser = argparse.ArgumentParser(prog="cbp", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # the commands a config file configures store only the flags given; Flags holds the defaults
    pretrain = Flags(sub.add_parser("pretrain", help="plain full-precision training; saves a checkpoint",
                                    argument_default=argparse.SUPPRESS))
    pretrain.add(pretrain.parser, "--model", choices=MODEL_NAMES, default="resnet20")
    pretrain.add(pretrain.parser, "--weights", help="start from 'torchvision' weights (the paper's), "
                 "'torchvision:MEMBER' (e.g. torchvision:IMAGENET1K_V2) or a local file")
    _common(pretrain, lr=0.1, weight_decay=5e-4, batch_size=128, epochs=10)

    quantize = Flags(sub.add_parser("quantize", help="CBP from a pretrained checkpoint",
                                    argument_default=argparse.SUPPRESS))
    src = quantize.parser.add_argument_group("pretrained model (one of)")
    quantize.add(src, "--from", dest="from_checkpoint", help="checkpoint of `cbp pretrain`")
    quantize.add(src, "--model", choices=MODEL_NAMES, help="model name, with --weights")
    quantize.add(src, "--weights", help="'torchvision' (the paper's published weights), "
                 "'torchvision:MEMBER' or a local weights file")
    quantize.add(quantize.parser, "--recipe", choices=RECIPES,
                 help="a packaged method recipe (cbp/configs/recipes/NAME.toml; best: what "
                      "measured closest to full precision); --config and flags win over it")
    _add_cbp_flags(quantize, quantize.parser.add_argument_group("CBP (defaults: the paper's)"))
    g = quantize.parser.add_argument_group("oscillations and BatchNorm (see benchmarks/RESULTS.md)")
    quantize.add(g, "--oscillation-fix", choices=tuple(OSCILLATION_FIXES),
                 help="dampen / freeze: Nagel et al. (ICML 2022), with --no-constraint for their "
                      "STE methods, annealed over --epochs; gate: CBP's pull on oscillating "
                      "weights only (this project's variant)")
    quantize.add(g, "--recalibrate-bn", type=at_least(0), default=0, metavar="N",
                 help="at the end, re-estimate BatchNorm statistics on N training batches "
                      "(saved in the checkpoint; top-1 reported before and after)")
    g = quantize.parser.add_argument_group(
        "distillation from the full-precision model (cbp.training.distill)")
    quantize.add(g, "--distill", action="store_true",
                 help="loss = (1 - alpha) * task + alpha * T^2 * KL(teacher || student); the "
                      "teacher is the float model quantizing starts from, or --teacher")
    quantize.add(g, "--teacher", metavar="CKPT", help="a `cbp pretrain` checkpoint to distil "
                 "from instead (another architecture is fine; same classes or vocabulary)")
    quantize.add(g, "--distill-alpha", type=float, default=DEFAULT_ALPHA,
                 help="weight of the distillation term, in (0, 1] (default: %(default)s)")
    quantize.add(g, "--distill-temperature", type=float, default=DEFAULT_TEMPERATURE,
                 help="softmax temperature T of both distributions (default: %(default)s)")
    _common(quantize, lr=1e-3, weight_decay=1e-4, batch_size=256, epochs=1000)

    p = sub.add_parser("evaluate", help="top-1/top-5 (loss and bits per character) and CFS")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--val-limit", type=at_least(1))
    p.add_argument("--image-size", type=at_least(1), default=224)
    p.add_argument("--device")
    p.add_argument("--recalibrate-bn", type=at_least(0), default=0, metavar="N",
                   help="also report top-1 after re-estimating BatchNorm statistics on N training "
                        "batches (the checkpoint is not changed)")
    p.add_argument("--batch-size", type=at_least(1), default=256,
                   help="batch size of the BatchNorm re-estimation")
    p.add_argument("--seed", type=random_seed, default=0, help="order of the re-estimation batches")

    p = sub.add_parser("generate", help="sample text from a language-model checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="\n", help="text the sample continues")
    p.add_argument("--tokens", type=at_least(0), default=300, help="characters to generate")
    p.add_argument("--seed", type=random_seed, default=0, help="the same seed gives the same text")
    p.add_argument("--temperature", type=temperature, default=1.0,
                   help="divides the logits: below 1 likelier tokens, above 1 more random (>= 0.001)")
    p.add_argument("--top-k", type=at_least(1), help="sample from the k likeliest characters only")
    p.add_argument("--context-shift", type=at_least(1), default=1, metavar="N",
                   help="past the context, drop the oldest N characters at once and read the rest "
                        "again: 1 (default) keeps the whole context for every character; e.g. 64 "
                        "samples other text, several times faster")

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
    return parser, {"pretrain": pretrain, "quantize": quantize}


_NUMBER_LIST = re.compile(r"^-[^-].*,")  # "-1,0,1", "-inf,1": no option holds a comma


def _negative_value(token: str) -> bool:
    """A negative number or a list starting with one: "-1,0,1", "-1e-4", "-inf"."""
    try:
        float(token)
    except ValueError:
        return bool(_NUMBER_LIST.match(token))
    return token.startswith("-")


def _glue_number_lists(argv: list[str]) -> list[str]:
    """``--levels -1,0,1`` as ``--levels=-1,0,1``: argparse takes "-1,0,1" for an option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _negative_value(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def parse_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    """Parse the command line once; for ``pretrain`` / ``quantize`` merge, the later winning:
    the defaults, ``--recipe``'s values, ``--config``'s values, the flags given.

    Their ``args._given`` holds the settings the flags and config files set (a config's value
    counts as given on ``--resume``).
    """
    argv = _glue_number_lists(list(sys.argv[1:] if argv is None else argv))
    parser, commands = build_parsers(description)
    given = vars(parser.parse_args(argv))
    flags = commands.get(given["command"])
    if flags is None:
        return argparse.Namespace(**given)
    files = [f"recipes/{given['recipe']}"] if "recipe" in given else []
    files += [given["config"]] if "config" in given else []
    from_config: dict = {}
    for name in files:   # the later wins
        from_config.update(_old_spelling(flags.from_config(read_config(name, given["command"]),
                                                           name)))
    given = _old_spelling(given)
    args = argparse.Namespace(command=given["command"])
    for dest, default in flags.defaults.items():
        setattr(args, dest, given.get(dest, from_config.get(dest, default)))
    args._given = (set(given) - {"command"}) | set(from_config)
    return args


def _old_spelling(settings: dict) -> dict:
    """``constraint``, the old name of ``levels``, as ``levels``: ``constraint = NAME`` is
    ``levels = NAME``; ``constraint = "custom"`` said that the factors are ``levels``'."""
    if "constraint" not in settings:
        return settings
    settings = dict(settings)
    constraint, levels = settings.pop("constraint"), settings.get("levels")
    if constraint == "custom":
        settings.setdefault("levels", "custom")   # cbp_config asks for the factors
    elif levels is not None and levels != constraint:
        raise ValueError(f"--constraint {constraint} and --levels {levels} name two level sets: "
                         "pass --levels alone")
    else:
        settings["levels"] = constraint
    return settings


def cbp_config(args: argparse.Namespace) -> CBPConfig:
    """The CBPConfig of parsed ``quantize`` arguments."""
    levels = args.levels
    if levels == "custom":   # --constraint custom with no factors
        raise ValueError("--constraint custom needs --levels, e.g. --levels -1,0,1")
    if levels not in LEVEL_SETS:
        try:
            levels = [float(x) for x in levels.split(",")]
        except ValueError as err:
            raise ValueError(f"--levels must be one of {', '.join(LEVEL_SETS)} or comma-separated "
                             f"numbers, got {args.levels!r}") from err
    try:
        return CBPConfig(levels=levels, **{f.name: getattr(args, f.name) for f in cbp_fields()})
    except SettingError as err:   # CBPConfig's check, in the words of the command line
        raise ValueError(f"--{err.name.replace('_', '-')} {err.requirement}") from None


# ---- for the library -----------------------------------------------------------------------------

_RUN_ONLY = ("command", "config", "recipe", "out", "resume", "overwrite", "quiet")


@dataclass(frozen=True)
class Recipe:
    """What ``cbp COMMAND --config NAME`` runs with: the CBP settings and the training settings.

    ``training`` holds every other setting of the command by its flag's name: ``lr``,
    ``momentum``, ``weight_decay``, ``batch_size``, ``epochs``, ``epoch_iters`` (steps per epoch;
    None: a full pass over the training set), ``seed``, the data and the model.
    """

    cbp: CBPConfig | None     # None for pretraining
    training: dict


def load_config(name: str | None, command: str = "quantize", recipe: str | None = None) -> Recipe:
    """The settings of a config file or packaged config, read exactly as the CLI reads them.

    ``cbp.load_config("demo")`` is what ``cbp quantize --config demo`` (the demo's CBP run) uses,
    ``cbp.load_config("demo", "pretrain")`` its pretraining, ``"paper/resnet50-binary"`` a paper
    cell; ``recipe="best"`` adds ``--recipe best`` (``load_config(None, recipe="best")``: the
    recipe alone); the CLI's defaults fill in what the files do not set.
    """
    if command not in TABLES:
        raise ValueError(f"command must be one of {', '.join(TABLES)}, got {command!r}")
    if recipe is not None and (recipe not in RECIPES or command != "quantize"):
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)} (for quantize), got "
                         f"{recipe!r} for {command}")
    args = parse_args([command, "--out", os.devnull, *(["--config", name] if name else []),
                       *(["--recipe", recipe] if recipe else [])])
    cbp_keys = {"constraint", "levels", *(f.name for f in cbp_fields())}
    training = {k: v for k, v in vars(args).items()
                if k not in _RUN_ONLY and (command == "pretrain" or k not in cbp_keys)}
    return Recipe(cbp_config(args) if command == "quantize" else None, training)
