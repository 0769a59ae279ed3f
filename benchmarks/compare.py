"""When is CBP worth it? Low-bit methods side by side, paired, before and after BN re-estimation.

    .venv/bin/python benchmarks/compare.py            # the headline cell, ~21 min on 2 cores
    .venv/bin/python benchmarks/compare.py --full     # the whole grid
    .venv/bin/python benchmarks/compare.py --quick    # CI size, < 3 min

Two networks, each pretrained once on Fashion-MNIST (cached under ``--cache``): a tiny
MobileNetV2 (``cbp.zoo.models.mobilenetv2_tiny``, depthwise convs, the primary model) and ResNet-20
width 8 (the control). Every method starts from that checkpoint, per level set and seed:

  fp          the checkpoint itself (reference)
  rounding    post-training rounding, a = mean|W| (``cbp.post_training_rounding``)
  ste         STE-only fine-tuning: ``CBPConfig(use_constraint=False)`` on CBP's g / p clock
  dampen      STE + oscillation dampening, Nagel et al. ICML 2022 (``cbp.OscillationDampening``)
  freeze      STE + iterative weight freezing, Nagel et al. (``cbp.IterativeFreezing``), their
              settings (which hardly act in 950 steps)
  freeze_run  the same with thresholds that act within these runs (``FREEZE_RUN``)
  cbp_1e-4    CBP as published, eta_lambda 1e-4 (the paper's), window schedule g = 1, 2, ...
  cbp_1e-3    the same with eta_lambda 1e-3
  cbp_1e-2    the same with eta_lambda 1e-2
  no_window   CBP with g = inf from the start (paper Table 2 ablation), eta_lambda 1e-2
  no_window_1e-4  the same with the paper's eta_lambda 1e-4: a gentle pull on every weight that
              grows through the run, like dampening (a second variant, added after the first
              default run showed dampening ahead)
  cbp_gated   CBP (eta_lambda 1e-2) whose pull acts only on weights seen oscillating
              (``cbp.OscillationGatedCBP``, this project's variant)
  brevitas    Brevitas QAT, its binary / ternary per-tensor weight quantizers (``bench`` extra)
  brevitas_noclamp  Brevitas binary without its in-place clamp of the stored weights
  X+kd, X+pc  method X with distillation from the float checkpoint / per-channel scales
              (``--recipes``)

Equal budget, paired seeds: per seed every trained method runs the same steps on the same data
order with the same SGD, batch, lr and weight decay, from the same checkpoint. The length is what
the CBP schedule (p_max 1) needs to pass ``g_final``: 19 epochs of 50 steps; the lr drops x0.1
where CBP's does (g reaches 20, after epoch 10): through the shared g / p clock for the methods
built on ``cbp.Lagrangian`` (also STE-only, dampening and freezing, which take CBP's gradient
clipping and weight clamping too), a ``MultiStepLR`` for no-window CBP (whose g is inf) and
Brevitas (plain SGD steps). Every trained cell is evaluated on the 10,000 test images twice:
with the BatchNorm statistics training left, and after re-estimating them on 50 training batches
(``cbp.recalibrate_bn``, the same batches for every method of a seed). Differences to STE-only
are per-seed pairs, mean ± standard error and a paired t-test; "real" only when the test survives
a Holm-Bonferroni correction over every contrast of its table (``paired.py``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
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
from cbp.core.distributed import setup
from cbp.core.layers import select_layers
from cbp.core.oscillation import OscillationTracker
from cbp.training import peers
from cbp.training.train import Run, evaluate, fit
from cbp.zoo.data import load_fashion_mnist, make_loader
from cbp.zoo.models import load_weights, mobilenetv2_tiny, resnet20

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmarks' shared modules
from common import add_pool_flags, publish  # noqa: E402
from paired import holm, mean_se, paired  # noqa: E402

MODELS = {"mobilenet": "tiny MobileNetV2", "resnet": "ResNet-20 width 8"}
LEVELS = ("binary", "ternary")
TRAINED = ("ste", "dampen", "freeze", "freeze_run", "cbp_1e-4", "cbp_1e-3", "cbp_1e-2",
           "no_window", "no_window_1e-4", "cbp_gated", "brevitas", "brevitas_noclamp")
# Toward full precision (issue 23): a trained method with "+kd" (distillation from the float
# checkpoint, cbp.Distillation's default alpha and temperature) and/or "+pc" (per-output-channel
# scales, CBPConfig(scale="per-channel")).
VARIANTS = ("ste+kd", "ste+pc", "ste+kd+pc", "cbp_1e-4+kd", "cbp_1e-4+pc", "cbp_1e-4+kd+pc",
            "dampen+kd+pc")
TRAINED = (*TRAINED, *VARIANTS)
METHODS = ("fp", "rounding", *TRAINED)
LABELS = {"fp": "full precision", "rounding": "post-training rounding",
          "ste": "STE-only", "dampen": "STE + oscillation dampening (Nagel)",
          "freeze": "STE + iterative freezing (Nagel's settings)",
          "freeze_run": "STE + iterative freezing (thresholds for this run)",
          "cbp_1e-4": "CBP, η_λ 1e-4 (paper)",
          "cbp_1e-3": "CBP, η_λ 1e-3", "cbp_1e-2": "CBP, η_λ 1e-2",
          "no_window": "CBP without window, η_λ 1e-2",
          "no_window_1e-4": "CBP without window, η_λ 1e-4 (variant)",
          "cbp_gated": "oscillation-gated CBP, η_λ 1e-2 (variant)",
          "brevitas": "Brevitas QAT (binary: its in-place clamp)",
          "brevitas_noclamp": "Brevitas QAT, binary without the in-place clamp"}
BASELINE = "ste"
MODIFIERS = {"kd": "distillation", "pc": "per-channel scales"}
LABELS.update({v: " + ".join([LABELS[v.split("+")[0]]] + [MODIFIERS[m] for m in v.split("+")[1:]])
               for v in VARIANTS})


@dataclass(frozen=True)
class Size:
    """Everything that decides the numbers; the cached checkpoints are keyed by the pretraining part."""

    train_limit: int | None    # first N training images, for pretraining and fine-tuning
    val_limit: int             # test images evaluated after every epoch (monitoring only)
    test_limit: int | None     # test images of the two final evaluations (None: all 10,000)
    pretrain_epochs: int
    pretrain_batch: int
    batch: int
    epoch_iters: int
    lr: float
    weight_decay: float
    p_max: int
    g_final: float
    bn_batches: int            # batches of the BatchNorm re-estimation (training batch size)
    seeds_primary: int         # seeds of the MobileNetV2 cells
    seeds_control: int         # seeds of the ResNet-20 cells
    budget: int = 1            # the budget ladder's k: epochs of k * epoch_iters steps (same g path)

    @property
    def steps_per_epoch(self) -> int:
        """Steps between two ``end_epoch`` calls: CBP's clock stretched k times, so g, the lr drop
        and the stop come at the same fraction of a k times longer run."""
        return self.epoch_iters * self.budget


FULL = Size(train_limit=10000, val_limit=256, test_limit=None, pretrain_epochs=3,
            pretrain_batch=128, batch=32, epoch_iters=50, lr=1e-2, weight_decay=1e-4, p_max=1,
            g_final=100, bn_batches=50, seeds_primary=5, seeds_control=3)
QUICK = Size(train_limit=1024, val_limit=64, test_limit=512, pretrain_epochs=1,
             pretrain_batch=64, batch=16, epoch_iters=2, lr=1e-2, weight_decay=1e-4, p_max=1,
             g_final=10, bn_batches=4, seeds_primary=2, seeds_control=2)

# (model, level set, methods): the default run is the headline, the primary cell with every
# method but two that add nothing at this budget - Nagel's freezing thresholds, which freeze under
# 0.1% of the weights in 950 steps (freeze_run is the freezing that acts), and the no-window
# ablation at eta 1e-4 beside the one at 1e-2 - in ~21 min on 2 cores (issue 22 caps it at 25).
# The ternary cells and the budget are the ladder's (ladder.py); --full runs every method on all
# four cells (~55 min).
HEADLINE = tuple(m for m in METHODS if m not in VARIANTS)
DEFAULT_METHODS = tuple(m for m in HEADLINE if m not in ("freeze", "no_window_1e-4"))
DEFAULT_PLAN = (("mobilenet", "binary", DEFAULT_METHODS),)
FULL_PLAN = tuple((m, lv, HEADLINE) for m in MODELS for lv in LEVELS)
# --recipes (issue 23): {none, distillation, per-channel, both} x {STE-only, CBP as published},
# and dampening with both, on the primary cell and on ternary ResNet-20
RECIPES = ("fp", "ste", "cbp_1e-4", *VARIANTS)
RECIPE_PLAN = (("mobilenet", "binary", RECIPES),
               ("resnet", "ternary", tuple(m for m in RECIPES if not m.startswith("dampen"))))


def seeds(size: Size, model: str) -> int:
    return size.seeds_primary if model == "mobilenet" else size.seeds_control


def build(model: str) -> nn.Module:
    return mobilenetv2_tiny() if model == "mobilenet" else resnet20(width=8)


def cbp_config(size: Size, levels: str, method: str) -> cbp.CBPConfig:
    """The library configuration of a method built on ``cbp.Lagrangian``."""
    # compile_penalty off: compiling costs more than it saves on these short CPU runs
    base = cbp.CBPConfig(levels=levels, multiplier_lr=1e-2, p_max=size.p_max,
                         stop_once_g_exceeds=size.g_final, compile_penalty=False)
    if method in ("ste", "dampen", "freeze", "freeze_run"):
        return replace(base, use_constraint=False)
    if method.startswith("cbp_1e-"):
        return replace(base, multiplier_lr=float(method[4:]))
    if method == "cbp_gated":
        return base
    if method.startswith("no_window"):  # g = inf: the clock would drop the lr and stop at once
        eta = 1e-4 if method == "no_window_1e-4" else 1e-2
        return replace(base, g_init=math.inf, lr_drop_at_g=None, stop_once_g_exceeds=None,
                       multiplier_lr=eta)
    raise ValueError(f"no CBP configuration for method {method!r}")


def schedule_epochs(config: cbp.CBPConfig) -> tuple[int, int | None]:
    """``(epochs, lr_drop_epoch)`` of a CBP schedule that updates g once every ``p_max`` epochs
    (``lr_drop_epoch`` None: the stop comes first). Also used by ``compare_gpt.py``.

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


def schedule(size: Size) -> tuple[int, int | None]:
    """``(epochs, lr_drop_epoch)`` every trained cell of ``size`` runs: CBP's."""
    return schedule_epochs(cbp_config(size, "binary", "cbp_1e-2"))


@lru_cache(maxsize=2)
def datasets(size: Size):
    train = load_fashion_mnist(train=True, limit=size.train_limit)
    test = load_fashion_mnist(train=False, limit=size.test_limit)
    return train, Subset(test, range(size.val_limit)), test


def checkpoint_path(size: Size, cache: str, model: str) -> str:
    key = f"n{size.train_limit}-e{size.pretrain_epochs}-b{size.pretrain_batch}"
    return os.path.join(cache, f"fp-{model}-{key}.safetensors")


def pretrain(size: Size, cache: str, model: str) -> str:
    """The shared full-precision checkpoint of ``model``: trained once, then read from the cache."""
    path = checkpoint_path(size, cache, model)
    if os.path.exists(path):
        return path
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # on a shared machine, one thread per process is much faster
    torch.manual_seed(0)
    train, val, _ = datasets(size)
    net = build(model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(cbp.param_groups(net, 5e-4), lr=0.1, momentum=0.9)
    fit(Run(model=net, optimizer=optimizer, train_data=train, val_data=val,
            out_dir=os.path.join(cache, f"pretrain-{model}"), epochs=size.pretrain_epochs,
            batch_size=size.pretrain_batch, ctx=setup("cpu"), channels_last=True, show_progress=False,
            scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.pretrain_epochs)))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def brevitas_model(model: nn.Module, levels: str, clamp: bool = True) -> nn.Module:
    """The same network with Brevitas weight quantizers on the layers cbp would quantize.

    Each layer's constant scale is its pretrained mean|W|, the scale cbp uses, so the level sets
    are identical and only the training differs. Brevitas' binary quantizer
    (``SignedBinaryWeightPerTensorConst``, built on ``ClampedBinaryQuant``) clamps the stored
    weights to [-a, a] in place at every forward; its ternary one clamps only the integer codes.
    ``clamp=False`` swaps the binary clamp for Brevitas' out-of-place ``TensorClampSte``, so the
    two level sets train alike and the in-place clamp's effect can be measured on its own.
    """
    import brevitas.nn as qnn
    from brevitas.core.function_wrapper import TensorClampSte
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst
    from brevitas.quant.ternary import SignedTernaryWeightPerTensorConst

    quant = {"binary": SignedBinaryWeightPerTensorConst,
             "ternary": SignedTernaryWeightPerTensorConst}[levels]
    if not clamp and levels == "binary":
        quant = quant.let(tensor_clamp_impl=TensorClampSte)
    for name in select_layers(model, cbp.CBPConfig(levels)):
        conv = model.get_submodule(name)
        scale = float(conv.weight.detach().abs().mean())
        new = qnn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                              stride=conv.stride, padding=conv.padding, groups=conv.groups,
                              bias=conv.bias is not None, weight_quant=quant,
                              weight_scaling_const=scale)
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


class TimedTracker(OscillationTracker):
    """The oscillation tracker, timing itself: what keeping it on costs."""

    seconds = 0.0

    def step(self) -> None:
        tic = time.perf_counter()
        super().step()
        self.seconds += time.perf_counter() - tic


# Iterative freezing with thresholds that act within these runs. Nagel et al.'s 3-bit settings
# (EMA momentum 0.001, threshold 0.1 -> 0.011) froze 0.04% of the weights here: the EMA needs
# ~1000 steps to build up and binary weights oscillate rarely (in the second half of a 1x STE run
# 1.1% of the weights oscillate at all, 0.26% five times or more). With the tracker's memory of
# ~100 steps (momentum 0.01) and thresholds 5x lower (0.02 -> 0.002, i.e. one oscillation in
# 50 -> 500 steps), it freezes the weights that oscillate repeatedly; the schedule (off for the
# first 25%, then cosine) follows the run's length at every budget.
FREEZE_RUN = {"momentum": 0.01, "threshold": 0.02, "final_threshold": 0.002}


PEER_OF = {"dampen": ("dampen", {}), "freeze": ("freeze", {}), "freeze_run": ("freeze", FREEZE_RUN),
           "cbp_gated": ("gate", {})}   # method -> (cbp.training.peers.build's name, its options)


def lagrangian_for(method: str, model: nn.Module, config: cbp.CBPConfig, optimizer,
                   total_steps: int) -> cbp.Lagrangian:
    name, options = PEER_OF.get(method, (None, {}))
    return peers.build(name, model, config, optimizer, total_steps=total_steps, **options)


def bn_loader(size: Size, train, seed: int):
    """The re-estimation batches: the same for every method of a seed."""
    loader = make_loader(train, size.batch, train=True, seed=10_000 + seed)
    loader.sampler.set_epoch(0)
    return loader


def run_one(size: Size, checkpoint: str, cache: str, model_name: str, method: str, levels: str,
            seed: int, device: str = "cpu") -> dict:
    """One cell: train (or not) from the checkpoint, evaluate, re-estimate BN, evaluate again."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tic = time.perf_counter()
    train, val, test = datasets(size)
    ctx = setup(device)
    model = load_weights(build(model_name), checkpoint)
    model.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU
    result = {"model": model_name, "method": method, "levels": levels, "seed": seed}
    method, *modifiers = method.split("+")   # the base method; "kd" / "pc" variants (VARIANTS)
    distillation = None
    if "kd" in modifiers:   # the teacher: the float checkpoint itself
        teacher = load_weights(build(model_name), checkpoint).to(memory_format=torch.channels_last)
        distillation = cbp.Distillation(teacher.to(ctx.device))
    if method == "rounding":
        cbp.prepare(model, cbp.CBPConfig(levels))
    elif method.startswith("brevitas"):
        brevitas_model(model, levels, clamp=method == "brevitas")
    elif method != "fp":
        config = cbp_config(size, levels, method)
        if "pc" in modifiers:
            config = replace(config, scale="per-channel")
        cbp.prepare(model, config)
    model.to(ctx.device)  # prepared on the CPU, as the CLI does
    if method not in ("fp", "rounding"):
        epochs, drop = schedule(size)
        lagrangian = scheduler = tracker = None
        if not method.startswith("brevitas"):
            tracker = TimedTracker(model)
        optimizer = torch.optim.SGD(cbp.param_groups(model, size.weight_decay), lr=size.lr,
                                    momentum=0.9)
        if method.startswith(("no_window", "brevitas")):  # no usable g clock: drop by epoch
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [drop], 0.1)
        if not method.startswith("brevitas"):
            lagrangian = lagrangian_for(method, model, config, optimizer,
                                        epochs * size.steps_per_epoch)
        train_tic = time.perf_counter()
        rows = fit(Run(model=model, optimizer=optimizer, train_data=train, val_data=val,
                       out_dir=os.path.join(cache, "runs",
                                           f"{model_name}-{result['method']}-{levels}-{seed}"),
                       epochs=epochs, batch_size=size.batch, ctx=ctx, lagrangian=lagrangian,
                       scheduler=scheduler, epoch_iters=size.steps_per_epoch, seed=seed,
                       channels_last=True, show_progress=False, oscillation=tracker,
                       distillation=distillation))
        train_seconds = time.perf_counter() - train_tic
        last = rows[-1]
        result.update(epochs=len(rows), g=last.get("g"), train_seconds=train_seconds,
                      lr_drop_epoch=next((r["epoch"] for r in rows if r["lr"] < size.lr), None))
        if tracker is not None:
            result["tracker_share"] = tracker.seconds / train_seconds
            # flips and oscillations per step over the last quarter of the epochs
            tail = rows[-max(1, len(rows) // 4):]
            for key in ("flips_per_step", "oscillations_per_step"):
                result[key] = statistics.mean(r[key] for r in tail)
            for key in ("oscillation_frequency", "late_flippers", "level_changes"):
                result[key] = last[key]
            result["frozen"] = last.get("frozen")
            result["gated"] = last.get("gated")
    if method.startswith("brevitas"):
        result.update(brevitas_stats(model, levels))
    elif method != "fp":
        result.update(cfs=cbp.cfs(model), on_levels=cbp.fraction_on_levels(model))
    result["top1_train_bn"] = evaluate(model, test, ctx, channels_last=True)["top1"]
    if method != "fp":
        cbp.recalibrate_bn(model, bn_loader(size, train, seed), size.bn_batches)
        result["top1"] = evaluate(model, test, ctx, channels_last=True)["top1"]
        result["bn_gap"] = result["top1"] - result["top1_train_bn"]
    else:
        result["top1"] = result["top1_train_bn"]
    result["seconds"] = time.perf_counter() - tic
    return result


def brevitas_missing() -> str | None:
    """Why the Brevitas row cannot run here, or None when it can."""
    try:
        import brevitas.nn  # noqa: F401
    except Exception as err:  # an incompatible install fails in many ways
        return f"brevitas cannot be imported: {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def tasks(size: Size, plan, methods=METHODS, levels=LEVELS, models=tuple(MODELS)) -> list[tuple]:
    """``(model, method, levels, seed)`` of every cell of ``plan`` that passes the filters."""
    out = []
    for model, lv, plan_methods in plan:
        if model not in models or lv not in levels:
            continue
        for method in plan_methods:
            if method not in methods:
                continue
            if method == "fp":
                if ("fp" not in [t[1] for t in out if t[0] == model]):
                    out.append((model, "fp", "-", 0))
            else:
                out += [(model, method, lv, s) for s in range(seeds(size, model))]
    return out


def committed(results: list[dict], size: Size, plan, methods=METHODS, levels=LEVELS,
              models=tuple(MODELS)) -> list[dict]:
    """The cells of ``plan`` in a results file, whatever code version computed them: the tables
    rebuilt from committed data. Cells under two keys (settings or code versions) are refused,
    never mixed."""
    wanted = set(tasks(size, plan, methods, levels, models))
    rows = [r for r in results if task_of(r) in wanted and r.get("budget", 1) == size.budget]
    keys = sorted({r["key"] for r in rows})
    if len(keys) > 1:
        raise ValueError(f"cells of {len(keys)} settings or code versions ({', '.join(keys)}) in "
                         "the results file; recompute one of them")
    return rows


def brevitas_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("brevitas")
    except Exception:  # not installed: the Brevitas rows are not run
        return None


@lru_cache(maxsize=4)
def code_version(device: str = "cpu") -> dict:
    """What a cell's numbers depend on besides its ``Size``: a hash of every ``cbp`` source file
    and of the benchmark files that compute a cell, the device, torch and Brevitas. A cached or
    committed cell whose version differs is recomputed, never mixed with this version's."""
    digest = hashlib.sha256()
    package = os.path.dirname(os.path.abspath(cbp.__file__))
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True))
    for path in [*files, os.path.join(here, "compare.py"), os.path.join(here, "paired.py")]:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return {"code": digest.hexdigest()[:12], "device": device_name(device),
            "torch": torch.__version__, "brevitas": brevitas_version()}


def cell_key(size: Size, version: dict) -> str:
    """The key of a cell's settings and code version (the seed counts are not part of a cell)."""
    settings = {k: v for k, v in asdict(size).items() if not k.startswith("seeds_")}
    text = json.dumps({"size": settings, "version": version}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def result_path(size: Size, cache: str, task: tuple, version: dict) -> str:
    return os.path.join(cache, "results", cell_key(size, version), "-".join(map(str, task)) + ".json")


def task_of(result: dict) -> tuple:
    return (result["model"], result["method"], result["levels"], result["seed"])


def read_results(path: str | None) -> list[dict]:
    """The cells of a results file (JSON lines, one cell each); none if it does not exist."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_results(path: str, results: list[dict]) -> None:
    """Merge ``results`` into the results file: a cell of the same key and task is replaced.
    Written to a temporary file and renamed, so an interrupted write loses nothing."""
    merged = {(r["key"], *task_of(r)): r for r in read_results(path) + results}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for _, r in sorted(merged.items(), key=lambda kv: str(kv[0])):
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


def _pin_worker(cores) -> None:
    """Worker initializer: one core of its own and one torch thread (no oversubscription)."""
    core = cores.get()
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _run_cached(size: Size, checkpoints: dict, cache: str, device: str, task: tuple) -> dict:
    result = run_one(size, checkpoints[task[0]], cache, *task, device=device)
    version = code_version(device)
    result.update(key=cell_key(size, version), version=version, budget=size.budget,
                  steps_per_epoch=size.steps_per_epoch)
    path = result_path(size, cache, task, version)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result


def run_all(size: Size, cache: str, plan=DEFAULT_PLAN, methods=METHODS, levels=LEVELS,
            models=tuple(MODELS), jobs: int = 2, reuse: bool = False,
            cached_only: bool = False, device: str = "cpu", known: list[dict] = ()) -> list[dict]:
    """Every cell of ``plan``; up to ``jobs`` worker processes, each pinned to its own core.

    The full-precision checkpoints are always trained on the CPU (or read from the cache), so
    that runs on another device start from the very same weights when given the same cache.
    On ``device="cuda"`` the workers share the one GPU.

    With ``reuse`` a cell is read, not rerun, when its result file in the cache or a cell of
    ``known`` (a committed results file) has the same key: the same settings and code version
    (:func:`code_version`); ``cached_only`` reads those and runs nothing (the table of an
    interrupted run).
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    if brevitas_missing():
        methods = [m for m in methods if not m.startswith("brevitas")]
    todo = tasks(size, plan, methods, levels, models)
    version = code_version(device)
    key = cell_key(size, version)
    stored = {task_of(r): r for r in known if r.get("key") == key}
    results, pending = [], []
    for task in todo:
        path = result_path(size, cache, task, version)
        if (reuse or cached_only) and task in stored:
            results.append(stored[task])
        elif (reuse or cached_only) and os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        elif not cached_only:
            pending.append(task)
    checkpoints = {m: pretrain(size, cache, m) for m in sorted({t[0] for t in pending})}
    cores = sorted(os.sched_getaffinity(0))[:max(1, jobs)]
    with tqdm(total=len(pending), desc="cells (model, method, level set, seed)",
              unit="cell") as bar:
        if len(cores) == 1:
            for task in pending:
                results.append(_run_cached(size, checkpoints, cache, device, task))
                bar.update()
            return results
        context = get_context("spawn")
        queue = context.Queue()
        for core in cores:
            queue.put(core)
        with ProcessPoolExecutor(len(cores), mp_context=context, initializer=_pin_worker,
                                 initargs=(queue,)) as pool:
            futures = [pool.submit(_run_cached, size, checkpoints, cache, device, t)
                       for t in pending]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
    return results


# ---- tables -------------------------------------------------------------------------------------

def _fmt(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, se = mean_se(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(se, fmt.lstrip('+'))}"


def _diff(d) -> str:
    return "—" if d is None else d.text()


def _rows(results, model, lv, method):
    if method == "fp":
        return [r for r in results if r["model"] == model and r["method"] == "fp"]
    return [r for r in results if r["model"] == model and r["method"] == method
            and r["levels"] == lv]


def accuracy_table(results: list[dict], model: str, lv: str) -> list[str]:
    """Top-1 after BN re-estimation (headline) and with training BN, and the paired differences."""
    out = ["| method | top-1, BN re-estimated | Δ vs STE-only (paired) | top-1, training BN | "
           "Δ vs STE-only (paired) |", "|---|---|---|---|---|"]
    base = _rows(results, model, lv, BASELINE)
    lines = []
    for method in METHODS:
        rows = _rows(results, model, lv, method)
        if not rows:
            continue
        contrasts = [None, None]
        if method not in ("fp", BASELINE) and base:
            contrasts = [paired(rows, base, "top1"), paired(rows, base, "top1_train_bn")]
        lines.append((method, rows, contrasts))
    holm([c for _, _, pair in lines for c in pair])   # the family: every contrast of this table
    for method, rows, (bn, train_bn) in lines:
        cols = [_fmt([r["top1"] for r in rows], ".2f"), _diff(bn) if bn or train_bn else "",
                _fmt([r["top1_train_bn"] for r in rows], ".2f"), _diff(train_bn) if bn or train_bn else ""]
        out.append(f"| {LABELS[method]} | " + " | ".join(cols) + " |")
    return out


def oscillation_table(results: list[dict], model: str, lv: str) -> list[str]:
    out = ["| method | flips / step | oscillations / step | EMA osc. frequency | "
           "late flippers | level changes | BN gap (points) | CFS | frozen / gated | "
           "tracker cost | s / cell |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS[1:]:
        rows = _rows(results, model, lv, method)
        if not rows:
            continue

        def col(key, fmt, scale=1.0, rows=rows):
            return _fmt([r[key] * scale if r.get(key) is not None else None for r in rows], fmt)

        held = col("frozen", ".2f", 100) if rows[0].get("frozen") is not None else (
            col("gated", ".2f", 100) if rows[0].get("gated") is not None else "—")
        out.append(f"| {LABELS[method]} | {col('flips_per_step', '.1f')} | "
                   f"{col('oscillations_per_step', '.1f')} | {col('oscillation_frequency', '.2e')} | "
                   f"{col('late_flippers', '.2f', 100)}% | {col('level_changes', '.2f', 100)}% | "
                   f"{col('bn_gap', '+.2f')} | {col('cfs', '.1e')} | {held}% | "
                   f"{col('tracker_share', '.1f', 100)}% | {col('seconds', '.0f')} |")
    return [line.replace("—%", "—") for line in out]


def table(results: list[dict], size: Size, missing: str | None = None) -> str:
    out = []
    cells = sorted({(r["model"], r["levels"]) for r in results if r["method"] != "fp"},
                   key=lambda c: (list(MODELS).index(c[0]), LEVELS.index(c[1])))
    for model, lv in cells:
        n = seeds(size, model)
        out += [f"### {MODELS[model]}, {lv} ({n} paired seeds)", "",
                *accuracy_table(results, model, lv), "", "Oscillations (last quarter of the "
                "run; late flippers: last flip in the last quarter of the steps; level changes: "
                "weights on another level than after rounding the checkpoint):", "",
                *oscillation_table(results, model, lv), ""]
    if missing:
        out += [f"Brevitas not run: {missing}", ""]
    epochs, drop = schedule(size)
    trained = [r for r in results if r.get("epochs") is not None]
    ran = sorted({(r["epochs"], r["lr_drop_epoch"]) for r in trained}, key=str)
    out += [f"Checked: every trained cell ran (epochs, first epoch at the dropped lr) = "
            f"{', '.join(map(str, ran))}." if trained else ""]
    out += [f"Every trained cell: {epochs} epochs × {size.steps_per_epoch} steps of batch {size.batch} "
            f"(lr {size.lr}, ×0.1 after epoch {drop}, momentum 0.9, weight decay "
            f"{size.weight_decay}); p_max = {size.p_max}, g_final = {size.g_final}; BN "
            f"re-estimated on {size.bn_batches} batches of {size.batch}. Top-1 in % on "
            f"{'all 10,000' if size.test_limit is None else size.test_limit} test images, "
            "mean ± standard error over seeds.",
            f"Settings: `{asdict(size)}`", f"Code version: {one_version(results)}"]
    return "\n".join(out) + "\n"


def one_version(results: list[dict]) -> str:
    """The code version every cell of a table shares; cells of two versions are never mixed."""
    versions = {json.dumps(r.get("version"), sort_keys=True) for r in results}
    if len(versions) > 1:
        raise ValueError(f"the cells come from {len(versions)} code versions: {sorted(versions)}; "
                         "recompute the stale ones (--reuse reruns every cell of another version)")
    return f"`{versions.pop()}`" if versions else "—"


def plot(results: list[dict], cache: str, model: str, lv: str, path: str) -> None:
    """Flips and oscillations per step over the epochs, each method's mean over seeds (from the
    cells' ``log.jsonl``), and the top-1 before and after BN re-estimation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbp.training.runs import LOG_NAME, read_jsonl

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    shown = []
    for i, method in enumerate(m for m in TRAINED if not m.startswith("brevitas")):
        rows = _rows(results, model, lv, method)
        logs = [read_jsonl(os.path.join(cache, "runs", f"{model}-{method}-{lv}-{r['seed']}",
                                        LOG_NAME)) for r in rows]
        if not logs:
            continue
        shown.append(method)
        epochs = [row["epoch"] for row in logs[0]]
        for ax, key in zip(axes[:2], ("flips_per_step", "oscillations_per_step")):
            mean = [statistics.mean(log[e][key] for log in logs) for e in range(len(epochs))]
            ax.plot(epochs, mean, marker=".", color=f"C{i}", label=LABELS[method])
    for ax, what in zip(axes[:2], ("level flips", "oscillations (reversed flips)")):
        ax.set(xlabel="epoch", ylabel="weights per step",
               title=f"{what} per step", yscale="symlog")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    methods = [m for m in METHODS[1:] if _rows(results, model, lv, m)]
    x = range(len(methods))
    top = max(statistics.mean(r["top1"] for r in _rows(results, model, lv, m)) for m in methods)
    floor = top - 15
    for offset, key, label in ((-0.2, "top1_train_bn", "training BN"),
                               (0.2, "top1", "BN re-estimated")):
        means = [statistics.mean(r[key] for r in _rows(results, model, lv, m)) for m in methods]
        axes[2].bar([i + offset for i in x], means, width=0.4, label=label)
        for i, mean in zip(x, means):  # a bar below the axis floor: its value, written in
            if mean < floor:
                axes[2].text(i + offset, floor + 0.3, f"{mean:.1f}", rotation=90, ha="center",
                             va="bottom", fontsize=7)
    axes[2].set_xticks(list(x), methods, rotation=60, fontsize=7)
    axes[2].set(ylabel="top-1 (%)", title="test top-1, mean over seeds", ylim=(floor, top + 2))
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{MODELS[model]}, {lv}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "the CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size (< 3 min)")
    p.add_argument("--full", action="store_true", help="the whole grid, not only the headline")
    p.add_argument("--recipes", action="store_true",
                   help="distillation and per-channel scales, with STE-only and CBP (issue 23)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated level sets")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--seeds", type=int, help="override both seed counts")
    add_pool_flags(p)
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where the cells train (pretraining stays on the CPU)")
    p.add_argument("--reuse", action="store_true", help="read cells already computed (same size)")
    p.add_argument("--cached", action="store_true",
                   help="only tabulate the cells already computed; train nothing (with --results: "
                   "that file's cells, of the code version that computed them)")
    p.add_argument("--results", help="a results file (JSON lines): cells of the same settings and "
                   "code version are read from it with --reuse/--cached, and every cell of this "
                   "run is merged into it")
    p.add_argument("--budget", type=int, default=1,
                   help="k of the budget ladder: every CBP epoch k times longer (benchmarks/ladder.py)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--json", help="also write every cell's result to this file")
    p.add_argument("--plot", help="write a PNG of flips, oscillations and top-1 of the first cell")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.budget < 1:
        p.error(f"--budget must be >= 1, got {args.budget}")
    size = replace(size, budget=args.budget)
    if args.seeds:
        size = replace(size, seeds_primary=args.seeds, seeds_control=args.seeds)
    models, levels, methods = ([x for x in s.split(",") if x]
                               for s in (args.models, args.levels, args.methods))
    unknown = (sorted(set(models) - set(MODELS)) + sorted(set(levels) - set(LEVELS))
               + sorted(set(methods) - set(METHODS)))
    if unknown:
        p.error(f"unknown model, level set or method: {', '.join(unknown)}")
    tic = time.perf_counter()
    plan = RECIPE_PLAN if args.recipes else FULL_PLAN if args.full else DEFAULT_PLAN
    results = run_all(size, args.cache, plan, methods, levels, models, args.jobs, args.reuse,
                      args.cached, args.device, known=read_results(args.results))
    if args.results:
        save_results(args.results, results)
        if args.cached:   # the tables of the committed cells, of the version that computed them
            results = committed(read_results(args.results), size, plan, methods, levels, models)
    wants_brevitas = any(m.startswith("brevitas") for m in methods)
    publish(table(results, size, brevitas_missing() if wants_brevitas else None),
            f"{args.jobs} worker(s) on {device_name(args.device)}", tic, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        first = next(r for r in results if r["method"] in TRAINED)
        plot(results, args.cache, first["model"], first["levels"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
