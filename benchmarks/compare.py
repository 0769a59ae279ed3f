"""Low-bit methods side by side: the paper's ablation, two baselines and Brevitas, one harness.

    .venv/bin/python benchmarks/compare.py                 # full size, see benchmarks/RESULTS.md
    .venv/bin/python benchmarks/compare.py --quick         # CI size, under a minute

One full-precision ResNet-20 is pretrained on Fashion-MNIST (cached under ``--cache``) and every
method starts from it, per level set and seed:

  fp          the checkpoint itself (reference; one checkpoint, so no spread)
  rounding    nearest level with a = mean|W|, BatchNorm statistics re-estimated (no training)
  ste         STE-only fine-tuning: ``CBPConfig(use_constraint=False)``
  no_window   CBP with g = inf from the start (paper Table 2 ablation)
  cbp         CBP as published: window schedule g = 1, 2, ..., 10, 20, ..., 100, 200
  brevitas    Brevitas QAT, its binary / ternary per-tensor weight quantizers (optional extra)

Equal budget: every trained method runs the same epochs of ``epoch_iters`` steps on the same data
order (seed) with the same SGD, batch, lr and weight decay. The epoch count is what the CBP
schedule needs for g to exceed ``stop_once_g_exceeds`` (so CBP ends with the weights on the
levels), and every method's lr drops x0.1 at the epoch where CBP's does (g reaches 20): through
``lr_drop_at_g`` for CBP and a ``MultiStepLR`` for the others. STE-only and no-window CBP get
CBP's gradient clipping and weight clamping too (they run through the same ``Lagrangian.step``);
Brevitas runs plain SGD steps.
Each run goes through ``cbp.train.fit``; the end-of-epoch evaluation uses a small validation slice
and the reported numbers come from one evaluation on the test set at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_context

import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm import tqdm

import cbp
from cbp.baselines import post_training_rounding
from cbp.data import load_fashion_mnist, make_loader
from cbp.distributed import setup
from cbp.layers import select_layers
from cbp.models import load_weights, resnet20
from cbp.train import Run, evaluate, fit

METHODS = ("fp", "rounding", "ste", "no_window", "cbp", "brevitas")
LABELS = {"fp": "full precision", "rounding": "post-training rounding + BN re-estimation",
          "ste": "STE-only fine-tuning", "no_window": "CBP without window (g = inf)",
          "cbp": "CBP as published (window schedule)", "brevitas": "Brevitas QAT"}
LEVELS = ("binary", "ternary", "shift1", "shift2")
BREVITAS_LEVELS = ("binary", "ternary")  # Brevitas has no {0, +-1, +-1/2(, +-1/4)} quantizer


@dataclass(frozen=True)
class Size:
    """Everything that decides the numbers; the cached checkpoint is keyed by the pretraining part."""

    width: int                 # ResNet-20 base width (16 is the demo's; 8 makes quantization cost;
                               # 4 crashes oneDNN's channels-last conv backward in torch 2.14 on CPU)
    train_limit: int | None    # first N training images, for pretraining and fine-tuning
    val_limit: int             # test images evaluated after every epoch (monitoring only)
    test_limit: int | None     # test images of the final evaluation (None: all 10,000)
    pretrain_epochs: int
    pretrain_batch: int
    batch: int
    epoch_iters: int
    lr: float
    weight_decay: float
    multiplier_lr: float       # eta_lambda
    p_max: int
    stop_once_g_exceeds: float
    bn_batches: int            # batches for the BatchNorm re-estimation of post-training rounding
    seeds: int


FULL = Size(width=8, train_limit=10000, val_limit=256, test_limit=None, pretrain_epochs=3,
            pretrain_batch=128, batch=32, epoch_iters=12, lr=1e-3, weight_decay=1e-4,
            multiplier_lr=1e-2, p_max=1, stop_once_g_exceeds=100, bn_batches=50, seeds=3)
QUICK = Size(width=8, train_limit=1024, val_limit=64, test_limit=512, pretrain_epochs=1,
             pretrain_batch=64, batch=16, epoch_iters=2, lr=1e-3, weight_decay=1e-4,
             multiplier_lr=1e-2, p_max=1, stop_once_g_exceeds=10, bn_batches=4, seeds=2)


def cbp_config(size: Size, levels: str, method: str) -> cbp.CBPConfig:
    """The library configuration of one trained method (Brevitas has none)."""
    # compile_penalty off: compiling costs more than it saves on these short CPU runs
    base = cbp.CBPConfig(levels=levels, multiplier_lr=size.multiplier_lr, p_max=size.p_max,
                         stop_once_g_exceeds=size.stop_once_g_exceeds, compile_penalty=False)
    if method == "cbp":
        return base
    # The others take the lr drop from a MultiStepLR at CBP's drop epoch, and never "finish".
    base = replace(base, lr_drop_at_g=None, stop_once_g_exceeds=None)
    if method == "ste":
        return replace(base, use_constraint=False)
    if method == "no_window":
        return replace(base, g_init=math.inf)
    raise ValueError(f"no CBP configuration for method {method!r}")


def schedule(size: Size) -> tuple[int, int]:
    """``(epochs, lr_drop_epoch)`` of the CBP schedule of ``size``, see :func:`schedule_epochs`."""
    return schedule_epochs(cbp_config(size, "binary", "cbp"))


def schedule_epochs(config: cbp.CBPConfig) -> tuple[int, int]:
    """``(epochs, lr_drop_epoch)`` of a CBP schedule that updates g once every ``p_max`` epochs
    (``lr_drop_epoch`` None: g_final comes first).

    With ``p_max <= 2`` that is exact: after an update ``L_sum_pre`` is reset to +inf, so the
    ``L_sum >= L_sum_pre`` test cannot fire before the ``p == p_max`` one.
    """
    g, updates, drop = config.g_init, 0, None
    while g <= config.stop_once_g_exceeds:
        g += config.g_increment(g)
        updates += 1
        if drop is None and g >= config.lr_drop_at_g:
            drop = updates
    return updates * config.p_max, (drop * config.p_max if drop else None)


@lru_cache(maxsize=2)
def datasets(size: Size):
    train = load_fashion_mnist(train=True, limit=size.train_limit)
    test = load_fashion_mnist(train=False, limit=size.test_limit)
    return train, Subset(test, range(size.val_limit)), test


def checkpoint_path(size: Size, cache: str) -> str:
    key = f"w{size.width}-n{size.train_limit}-e{size.pretrain_epochs}-b{size.pretrain_batch}"
    return os.path.join(cache, f"fp-resnet20-{key}.safetensors")


def pretrain(size: Size, cache: str) -> str:
    """The shared full-precision checkpoint: trained once, then read from the cache."""
    path = checkpoint_path(size, cache)
    if os.path.exists(path):
        return path
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # on a shared machine, one thread per process is much faster
    torch.manual_seed(0)
    train, val, _ = datasets(size)
    model = resnet20(width=size.width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    fit(Run(model=model, optimizer=optimizer, train_data=train, val_data=val,
            out_dir=os.path.join(cache, "pretrain"), epochs=size.pretrain_epochs,
            batch_size=size.pretrain_batch, ctx=setup("cpu"), channels_last=True, show_progress=False,
            scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.pretrain_epochs)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def brevitas_model(model: nn.Module, levels: str) -> nn.Module:
    """The same network with Brevitas weight quantizers on the layers cbp would quantize.

    Each layer's constant scale is its pretrained mean|W|, the scale cbp uses, so the level sets
    are identical and only the training differs.
    """
    import brevitas.nn as qnn
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst
    from brevitas.quant.ternary import SignedTernaryWeightPerTensorConst

    quant = {"binary": SignedBinaryWeightPerTensorConst,
             "ternary": SignedTernaryWeightPerTensorConst}[levels]
    for name in select_layers(model, cbp.CBPConfig(levels)):
        conv = model.get_submodule(name)
        scale = float(conv.weight.detach().abs().mean())
        new = qnn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              stride=conv.stride, padding=conv.padding, bias=conv.bias is not None,
                              weight_quant=quant, weight_scaling_const=scale)
        new.weight = conv.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@torch.no_grad()
def brevitas_stats(model: nn.Module, levels: str, tolerance: float = 0.01) -> dict:
    """CFS and fraction on levels of the Brevitas layers, as ``cbp.layer_stats`` defines them."""
    import brevitas.nn as qnn

    factors = torch.tensor(cbp.CBPConfig(levels).factors)
    y_sum = on = n = 0.0
    for m in model.modules():
        if isinstance(m, qnn.QuantConv2d):
            scale = float(m.quant_weight().scale.flatten()[0])
            w = m.weight.detach()
            level = factors * scale
            y_sum += float(cbp.sawtooth(w, level).double().sum())
            on += float(((w - cbp.quantize(w, level)).abs() <= tolerance * scale).sum())
            n += w.numel()
    return {"cfs": y_sum / n, "on_levels": on / n}


def run_one(size: Size, checkpoint: str, cache: str, method: str, levels: str, seed: int) -> dict:
    """One cell of one seed: train (or not) from the checkpoint, then evaluate on the test set."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, val, test = datasets(size)
    ctx = setup("cpu")
    model = load_weights(resnet20(width=size.width), checkpoint)
    model.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU
    result = {"method": method, "levels": levels, "seed": seed, "sec_per_epoch": None, "g": None}
    if method == "rounding":
        loader = make_loader(train, size.batch, train=True, seed=seed)
        loader.sampler.set_epoch(0)
        post_training_rounding(model, cbp.CBPConfig(levels), loader, size.bn_batches)
    elif method != "fp":
        epochs, drop = schedule(size)
        lagrangian = None
        if method == "brevitas":
            brevitas_model(model, levels)
        else:
            config = cbp_config(size, levels, method)
            cbp.prepare(model, config)
        optimizer = torch.optim.SGD(cbp.param_groups(model, size.weight_decay), lr=size.lr,
                                    momentum=0.9)
        scheduler = None  # CBP drops its lr itself (lr_drop_at_g); the others at the same epoch
        if method != "cbp":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [drop], 0.1)
        if method != "brevitas":
            lagrangian = cbp.Lagrangian(model, config, optimizer)
        rows = fit(Run(model=model, optimizer=optimizer, train_data=train, val_data=val,
                       out_dir=os.path.join(cache, "runs", f"{method}-{levels}-{seed}"),
                       epochs=epochs, batch_size=size.batch, ctx=ctx, lagrangian=lagrangian,
                       scheduler=scheduler, epoch_iters=size.epoch_iters, seed=seed,
                       channels_last=True, show_progress=False))
        result["sec_per_epoch"] = statistics.mean(r["seconds"] for r in rows)
        result["g"] = rows[-1].get("g")
        result["epochs"] = len(rows)
    if method == "brevitas":
        result.update(brevitas_stats(model, levels))
    elif method != "fp":
        result.update(cfs=cbp.cfs(model), on_levels=cbp.fraction_on_levels(model))
    scores = evaluate(model, test, ctx, channels_last=True)
    result.update(top1=scores["top1"], top5=scores["top5"])
    return result


def brevitas_missing() -> str | None:
    """Why the Brevitas row cannot run here, or None when it can."""
    try:
        import brevitas.nn  # noqa: F401
    except Exception as err:  # an incompatible install fails in many ways
        return f"brevitas cannot be imported: {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def tasks(size: Size, methods, levels) -> list[tuple[str, str, int]]:
    out = [("fp", "-", 0)] if "fp" in methods else []
    for method in methods:
        for lv in levels:
            if method != "fp" and (method != "brevitas" or lv in BREVITAS_LEVELS):
                out += [(method, lv, seed) for seed in range(size.seeds)]
    return out


def run_all(size: Size, cache: str, methods=METHODS, levels=LEVELS, jobs: int = 1) -> list[dict]:
    """Every (method, level set, seed) cell; ``jobs > 1`` runs cells in worker processes."""
    if "brevitas" in methods and brevitas_missing():
        methods = [m for m in methods if m != "brevitas"]
    checkpoint = pretrain(size, cache)
    todo = tasks(size, methods, levels)
    with tqdm(total=len(todo), desc="cells (method, level set, seed)", unit="cell") as bar:
        if jobs <= 1:
            results = []
            for task in todo:
                results.append(run_one(size, checkpoint, cache, *task))
                bar.update()
            return results
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, size, checkpoint, cache, *t) for t in todo]
            for _ in as_completed(futures):
                bar.update()
            return [f.result() for f in futures]


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def _spread(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(a: list[dict], b: list[dict]) -> str:
    """Top-1 of a minus b, called real only when it exceeds the two spreads added."""
    (ma, sa), (mb, sb) = _spread(a, "top1"), _spread(b, "top1")
    diff = ma - mb
    return f"{diff:+.2f} ({'real' if abs(diff) > sa + sb else 'within spread'})"


def table(results: list[dict], size: Size, levels=LEVELS, missing: str | None = None) -> str:
    """One markdown table per level set, methods as rows, mean ± std over seeds."""
    fp = [r for r in results if r["method"] == "fp"]
    out = []
    for lv in levels:
        out += [f"### {lv}", "",
                "| method | top-1 (%) | top-5 (%) | CFS | on levels | s / epoch |",
                "|---|---|---|---|---|---|"]
        for method in METHODS:
            rows = fp if method == "fp" else [r for r in results
                                               if r["method"] == method and r["levels"] == lv]
            if not rows:
                why = missing if method == "brevitas" and missing else "not run"
                if method == "brevitas" and lv not in BREVITAS_LEVELS:
                    why = "n/a: no such weight quantizer in Brevitas"
                out.append(f"| {LABELS[method]} | {why} | | | | |")
                continue
            cols = [_cell([r["top1"] for r in rows], ".2f"), _cell([r["top5"] for r in rows], ".2f")]
            for key, fmt in (("cfs", ".2e"), ("on_levels", ".3f"), ("sec_per_epoch", ".2f")):
                cols.append(_cell([r[key] for r in rows if r.get(key) is not None], fmt))
            out.append(f"| {LABELS[method]} | " + " | ".join(cols) + " |")
        by = {m: [r for r in results if r["method"] == m and r["levels"] == lv] for m in METHODS}
        notes = [f"{name}: {verdict(by['cbp'], by[other])}"
                 for name, other in (("CBP − STE-only", "ste"), ("CBP − no-window", "no_window"))
                 if by["cbp"] and by[other]]
        if fp and by["ste"]:
            notes.append(f"FP − STE-only: {verdict(fp, by['ste'])}")
        out += ["", "top-1 differences: " + "; ".join(notes) if notes else "", ""]
    epochs, drop = schedule(size)
    out += [f"Every trained cell: {epochs} epochs × {size.epoch_iters} steps of batch {size.batch} "
            f"(lr {size.lr}, ×0.1 after epoch {drop}); CBP η_λ = {size.multiplier_lr}, "
            f"p_max = {size.p_max}, stop once g exceeds {size.stop_once_g_exceeds}; "
            f"{size.seeds} seeds.",
            f"Settings: `{asdict(size)}`"]
    return "\n".join(out) + "\n"


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size (under a minute)")
    p.add_argument("--seeds", type=int, help="override the size's number of seeds")
    p.add_argument("--lr", type=float, help="override the size's fine-tuning lr")
    p.add_argument("--epoch-iters", type=int, help="override the size's steps per epoch")
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated level sets")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel worker processes")
    p.add_argument("--cache", default="runs/bench", help="checkpoint and run directory")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    overrides = {"seeds": args.seeds, "lr": args.lr, "epoch_iters": args.epoch_iters}
    size = replace(size, **{k: v for k, v in overrides.items() if v is not None})
    levels = [lv for lv in args.levels.split(",") if lv]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(levels) - set(LEVELS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown level set or method: {', '.join(unknown)}")
    tic = time.perf_counter()
    results = run_all(size, args.cache, methods, levels, args.jobs)
    text = table(results, size, levels, brevitas_missing())
    text += (f"\nMachine: {machine()}; {args.jobs} job(s); total wall "
             f"{time.perf_counter() - tic:.0f} s.\nCommand: `{' '.join(sys.argv)}`\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
