"""What does CBP cost per training step? Full precision vs STE-only vs CBP, same model and batch.

    .venv/bin/python benchmarks/step_time.py              # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/step_time.py --quick      # ~1 min, noisier
    .venv/bin/python benchmarks/step_time.py --repeat 3   # 3 full runs: median and spread
    .venv/bin/python benchmarks/step_time.py --distill    # also CBP + distillation (cbp.training.distill)

Each model is built twice from the same weights: plain (FP), and prepared, which the
quantized modes share - STE (a ``Lagrangian`` with ``use_constraint=False``: quantized forward,
straight-through backward, the same clipping, SGD and clamping as CBP), CBP and CBP eager differ
only in the Lagrangian whose ``step()`` ends their step. A CBP step is STE plus
``Lagrangian.add_penalty_grad`` (which clips the quantized weights' gradients in its own pass,
where STE clips them apart), so the CBP/STE ratio is the price of the constraint term. Sharing
the model matters: two identical models built in one process can differ by several % per step
(their tensors' places in memory, page faults), more than the penalty pass costs, which made
CBP/STE wander between 0.99 and 1.03 when each mode had its own model.
Modes alternate step by step (FP STE CBP ..., rotated each round) after a warm-up, and the median of each is
reported, so slow drifts (other processes, frequency scaling) hit all modes alike. CBP runs with
the compiled fused kernel (``compile_penalty=True``, what a long run uses from its start); the
eager form is timed too ("CBP eager"). ``--distill`` adds "CBP distill": the CBP step whose loss
is ``cbp.Distillation``'s, with the float model (the FP mode's weights, copied before its steps)
as the teacher - one more forward, no backward, so distill/CBP is what distillation costs.

Memory: the persistent bytes CBP adds per quantized weight are counted from the tensors
(lambda, and Adam's two moments unless ``multiplier_rule="plain"``). The peak of a step is, on
CUDA, ``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it; on
CPU, the growth of the peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) over the resident size just before the step, in a fresh process that
builds the model and runs steps of one mode only (after one untimed step): activations and
temporaries of the step, as the OS saw them. "State kept between steps" sums the bytes of the
weights, buffers, gradients, momentum, lambda and lambda's Adam moments.

``--repeat N`` makes N full timing runs, each in a fresh process (a run's heap layout, and so its
page faults, is part of what varies between runs), and reports each ratio's median and spread
(lowest - highest) over the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import trange

import cbp
from cbp.zoo.models import DEFAULT_SELECTION, LANGUAGE_MODELS, gpt, resnet20
from cbp.zoo.tasks import LanguageModel

MODES = ("fp", "ste", "cbp", "cbp_eager")
DISTILL_MODE = "cbp_distill"   # with --distill
MODELS = {  # name: (builder, input shape without the batch)
    "resnet20": (lambda: resnet20(num_classes=10, in_channels=1), (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
    "gpt": (lambda: gpt(84), (128,)),  # Shakespeare's 84 characters, windows of 128 (--batch 16)
}


def inputs(model_name: str, batch: int, device: torch.device,
           generator: torch.Generator | None = None,
           image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for the model: images and labels, or a language model's tokens and next tokens.

    ``image_size`` replaces an image model's default height and width (ResNet-18: 224 as on
    ImageNet, where the default 64 keeps CPU runs short)."""
    shape = MODELS[model_name][1]
    if image_size and model_name not in LANGUAGE_MODELS:
        shape = (shape[0], image_size, image_size)
    if model_name in LANGUAGE_MODELS:
        x, y = (torch.randint(0, 84, (batch, *shape), generator=generator) for _ in range(2))
    else:
        x = torch.randn((batch, *shape), generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device), y.to(device)


def build(model_name: str, mode: str, levels: str, rule: str, device: torch.device,
          prepared: tuple[nn.Module, torch.optim.Optimizer] | None = None):
    """A model and its step function for one mode; the same seed gives the same weights.

    ``prepared``: the ``(model, optimizer)`` of a quantized mode built before, to share.
    """
    if prepared is not None and mode != "fp":
        model, opt = prepared
        return model, *_lagrangian_step(model, _config(model_name, mode, levels, rule), opt)
    torch.manual_seed(0)
    builder, _ = MODELS[model_name]
    model = builder().to(device)
    if mode == "fp":
        opt = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)

        def update(loss: torch.Tensor) -> None:
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
            opt.step()
        return model, update, None, opt
    config = _config(model_name, mode, levels, rule)
    cbp.prepare(model, config)
    opt = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
    return model, *_lagrangian_step(model, config, opt)


def _config(model_name: str, mode: str, levels: str, rule: str) -> cbp.CBPConfig:
    """The configuration of a quantized mode: STE without the constraint, CBP compiled."""
    return cbp.CBPConfig(levels=levels, use_constraint=mode != "ste", multiplier_rule=rule,
                         compile_penalty=mode in ("cbp", DISTILL_MODE),
                         **DEFAULT_SELECTION.get(model_name, {}))


def _lagrangian_step(model: nn.Module, config: cbp.CBPConfig, opt: torch.optim.Optimizer):
    """``(update, lagrangian, optimizer)`` of a prepared model's mode."""
    lagrangian = cbp.Lagrangian(model, config, opt)
    lagrangian.g = 5.0  # mid-schedule: the window is on, and lambda is not all zero
    if config.use_constraint:  # compiles the fused kernel step() calls now, not in a timed step
        lagrangian.add_penalty_grad(config.grad_clip_value)
        model.zero_grad(set_to_none=True)
    return lambda loss: lagrangian.step(), lagrangian, opt


def make_step(model: nn.Module, update: Callable, x: torch.Tensor, y: torch.Tensor,
              distillation: cbp.Distillation | None = None) -> Callable:
    loss_of = LanguageModel.loss if x.dtype == torch.long else F.cross_entropy

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        output = model(x)
        loss = loss_of(output, y)
        if distillation is not None:
            loss = distillation(x, output, loss)[0]
        loss.backward()
        update(loss)
    return step


def timed(step: Callable, device: torch.device) -> float:
    """Seconds for one step; on CUDA measured with events after draining the queue."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def check_fast_path(lagrangian: cbp.Lagrangian) -> float:
    """Largest |difference| between the compiled penalty gradient and autograd of penalty()."""
    weights = [layer.weight for layer in lagrangian.layers.values()]
    for w in weights:
        w.grad = torch.zeros_like(w)
    lagrangian.add_penalty_grad()
    fast = [w.grad.clone() for w in weights]
    with torch.enable_grad():
        reference = torch.autograd.grad(lagrangian.penalty(), weights)
    for w in weights:
        w.grad = None
    return max((a - b).abs().max().item() for a, b in zip(fast, reference))


def cbp_bytes_per_weight(lagrangian: cbp.Lagrangian) -> float:
    """Persistent bytes CBP holds per quantized weight: lambda plus its optimizer state."""
    n = sum(lam.numel() for lam in lagrangian.multipliers.values())
    total = sum(lam.nbytes for lam in lagrangian.multipliers.values())
    if lagrangian._ascent is not None:
        total += sum(t.nbytes for state in lagrangian._ascent.state.values()
                     for t in state.values() if torch.is_tensor(t))
    return total / n


def time_model(args, model_name: str, device: torch.device) -> dict:
    x, y = inputs(model_name, args.batch, device, torch.Generator().manual_seed(1), args.image_size)
    steps, info, prepared, teacher = {}, {}, None, None
    modes = MODES + ((DISTILL_MODE,) if args.distill else ())
    for mode in modes:
        t0 = time.perf_counter()
        model, update, lagrangian, opt = build(model_name, mode, args.levels, "adam", device,
                                               prepared)
        if mode == "fp":
            teacher = copy.deepcopy(model)
        else:
            prepared = (model, opt)
        distillation = cbp.Distillation(teacher) if mode == DISTILL_MODE else None
        steps[mode] = make_step(model, update, x, y, distillation)
        if mode == "cbp":
            info["build_s"] = time.perf_counter() - t0
            cbp_lagrangian = lagrangian
            info["max_grad_diff"] = check_fast_path(lagrangian)
            info["bytes_per_weight"] = cbp_bytes_per_weight(lagrangian)
            info["quantized_weights"] = sum(m.numel() for m in lagrangian.multipliers.values())
    info["bytes_per_weight_plain"] = cbp_bytes_per_weight(
        build(model_name, "cbp", args.levels, "plain", device)[2])
    clip = cbp_lagrangian.config.grad_clip_value   # as step() calls it: the clip is in the pass
    info["penalty_alone_s"] = statistics.median(
        timed(lambda: cbp_lagrangian.add_penalty_grad(clip), device) for _ in range(20))
    reps = args.reps[model_name]
    times = {mode: [] for mode in modes}
    for i in range(args.warmup + reps):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:  # rotate: no position bias
            t = timed(steps[mode], device)
            if i >= args.warmup:
                times[mode].append(t)
    info["median_s"] = {mode: statistics.median(ts) for mode, ts in times.items()}
    return info


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, lagrangian) -> int:
    """Bytes of every tensor a training run keeps between steps: weights, buffers, gradients,
    momentum, and for CBP lambda and its Adam moments (STE-only holds no lambda)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    optimizers = [opt] + ([lagrangian._ascent] if lagrangian and lagrangian._ascent else [])
    tensors += [t for o in optimizers for st in o.state.values() for t in st.values()
                if torch.is_tensor(t)]
    if lagrangian is not None:
        tensors += list(lagrangian.multipliers.values())
    return sum(t.nbytes for t in tensors)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def memory_child(model_name: str, mode: str, rule: str, levels: str, batch: int,
                 device: torch.device, image_size: int | None) -> None:
    """Runs in a fresh process: peak memory of steps of one mode, printed as JSON."""
    model, update, lagrangian, opt = build(model_name, mode, levels, rule, device)
    x, y = inputs(model_name, batch, device, image_size=image_size)
    step = make_step(model, update, x, y)
    step()  # allocates gradients, optimizer state, compiles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        for _ in range(2):
            step()
        peak = _proc_status_bytes("VmHWM") - before
    print(json.dumps({"peak_step": peak, "state": state_bytes(model, opt, lagrangian)}))


def image_size_flag(args) -> list[str]:
    """The ``--image-size`` flag of a child process, if the parent got one."""
    return ["--image-size", str(args.image_size)] if args.image_size else []


def measure_memory(args, model_name: str, device: torch.device) -> dict:
    results = {}
    for mode, rule in [("fp", "adam"), ("ste", "adam"), ("cbp", "adam"), ("cbp", "plain")]:
        cmd = [sys.executable, __file__, "--_memory-child", model_name, mode, rule,
               "--levels", args.levels, "--batch", str(args.batch), "--device", str(device),
               *image_size_flag(args)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[f"{mode}/{rule}" if mode == "cbp" else mode] = json.loads(out.splitlines()[-1])
    return results


RATIOS = {"CBP/STE": ("cbp", "ste"), "CBP/FP": ("cbp", "fp"), "STE/FP": ("ste", "fp"),
          "CBP eager/STE": ("cbp_eager", "ste"), "CBP distill/CBP": (DISTILL_MODE, "cbp")}


def spread(values: list[float], fmt: str) -> str:
    """``median (lowest-highest)`` of one figure over runs; just the value for one run."""
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} ({min(values):{fmt}}-{max(values):{fmt}})"


def timing_child(args, model_name: str) -> dict:
    """One full timing run of ``model_name`` in a fresh process."""
    cmd = [sys.executable, __file__, "--_timing-child", model_name, "--levels", args.levels,
           "--batch", str(args.batch), "--device", args.device, *(["--quick"] * args.quick),
           *(["--distill"] * args.distill),
           *image_size_flag(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def report(model_name: str, runs: list[dict], memory: dict | None, args) -> None:
    """Step medians, ratios and the penalty pass: each a median over runs, with the spread."""
    info, meds = runs[0], [run["median_s"] for run in runs]
    n = info["quantized_weights"]
    over = f", median (spread) of {len(runs)} runs" if len(runs) > 1 else ""
    size = f", {args.image_size}x{args.image_size}" if args.image_size else ""
    print(f"\n== {model_name}{size}, batch {args.batch}, {args.levels}, {n:,} quantized weights{over} ==")
    for mode in meds[0]:
        print(f"  {mode:11s} median step {spread([m[mode] * 1e3 for m in meds], '.2f')} ms, "
              f"{spread([args.batch / m[mode] for m in meds], '.0f')} samples/s")
    print("  " + "   ".join(f"{name} {spread([m[a] / m[b] for m in meds], '.4f')}"
                            for name, (a, b) in RATIOS.items() if a in meds[0]))
    penalty = [run["penalty_alone_s"] for run in runs]
    print(f"  add_penalty_grad alone (fused): {spread([p * 1e3 for p in penalty], '.2f')} ms = "
          f"{spread([p / m['ste'] * 100 for p, m in zip(penalty, meds)], '.2f')}% of an STE step")
    print(f"  fused kernel: build + compile {info['build_s']:.1f} s, "
          f"max |grad - autograd(penalty)| = {info['max_grad_diff']:.2e}")
    print(f"  CBP state per quantized weight: {info['bytes_per_weight']:.2f} B (adam: lambda + 2 "
          f"moments), {info['bytes_per_weight_plain']:.2f} B (plain rule: lambda only)")
    if memory:
        what = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth"
        for key, m in memory.items():
            print(f"  memory {key:10s}: state kept between steps {m['state'] / 2**20:7.1f} MiB, "
                  f"{what} during steps {m['peak_step'] / 2**20:8.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~1 min)")
    parser.add_argument("--models", default="resnet20,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--levels", default="binary")
    parser.add_argument("--image-size", type=int,
                        help="height and width of image inputs (default: 28 ResNet-20, 64 ResNet-18)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--distill", action="store_true",
                        help="also time CBP with distillation from the float model")
    parser.add_argument("--repeat", type=int, default=1,
                        help="full timing runs, each in a fresh process (median and spread)")
    parser.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_timing-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args._memory_child:
        model_name, mode, rule = args._memory_child
        memory_child(model_name, mode, rule, args.levels, args.batch, device, args.image_size)
        return
    args.warmup = 2 if args.quick else 5
    fast = device.type == "cuda"
    args.reps = {"resnet20": 200 if fast else (15 if args.quick else 60),
                 "resnet18": 100 if fast else (6 if args.quick else 25),
                 "gpt": 200 if fast else (10 if args.quick else 40)}
    if args._timing_child:
        print(json.dumps(time_model(args, args._timing_child, device)))
        return
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for model_name in args.models.split(","):
        if args.repeat == 1:
            runs = [time_model(args, model_name, device)]
        else:
            runs = [timing_child(args, model_name) for _ in trange(
                args.repeat, desc=f"{model_name} runs", leave=False)]
        memory = None if args.no_memory else measure_memory(args, model_name, device)
        report(model_name, runs, memory, args)


if __name__ == "__main__":
    main()
