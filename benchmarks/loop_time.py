"""Is cbp's training loop as fast as the loop a user would write? ``cbp.training.train.fit`` vs plain PyTorch.

    flock /tmp/cbp-core1.lock taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/loop_time.py                  # 4 cases x 6 runs, ~20 min on one core
    ... benchmarks/loop_time.py --case resnet20-pretrain --steps 50
    ... benchmarks/loop_time.py --profile gpt-quantize           # cProfile of cbp's side
    ... benchmarks/loop_time.py --without checkpoint --without bars+poll   # also cbp without those
    python benchmarks/loop_time.py --device cuda                  # on a GPU (flags after ours go to cbp)

Each case is a CLI command (``cbp pretrain``/``cbp quantize`` with the packaged ``demo`` or ``gpt``
config, quantize from a randomly initialised ``--model``), cut to ``--steps`` steps in
``--epochs`` epochs and 1,000 validation images (the GPT configs' own 200/16 windows). Both sides
run inside ``cbp.cli.training.run_training`` with its ``fit`` swapped for a timed function, so they get
the Run exactly as the CLI builds it (data from ``cbp.zoo.data``, model, optimizer, scheduler, the
Lagrangian, seed) and only the loop differs:

* cbp: ``cbp.training.train.fit`` as the CLI runs it: its ``make_loader``, progress bars (to stderr),
  oscillation tracking of a quantized model, the CBP end of epoch, evaluation, JSONL log, weight
  histogram, ``metrics.report`` and a checkpoint per epoch (the plots after it are skipped);
* plain: a hand-written loop over ``DataLoader(shuffle=True, drop_last=True)`` with the same batch:
  ``zero_grad``, forward, cross-entropy, ``backward``, ``optimizer.step()`` (pretraining, then the
  cosine scheduler per epoch) or the same ``Lagrangian.plan``/``step``/``end_epoch`` calls
  (quantize), and a plain evaluation of the same validation set per epoch.

Neither side augments: cbp's Fashion-MNIST reader has no augmentation. Sides alternate
(cbp plain cbp plain ...), ``--repeat`` (3) times each; the table gives each side's median and
the ratio of the medians, cbp / plain.

Measured (2-core x86_64, everything on core 1 under the lock while core 0 ran another benchmark;
the defaults: ``--steps 100 --epochs 2``, median of 3, 20 min)::

    case               cbp s (median)  plain s (median)  cbp/plain   cbp runs, plain runs (s)
    resnet20-pretrain           50.44             51.85      0.973   54.6 48.6 50.4, 51.9 54.3 49.2
    resnet20-quantize           51.93             51.89      1.001   51.9 50.4 54.2, 51.9 56.5 50.9
    gpt-pretrain                51.92             53.78      0.965   51.9 57.6 50.0, 53.7 53.8 55.6
    gpt-quantize                30.12             29.93      1.006   31.7 28.3 30.1, 30.2 28.3 29.9

Runs of one side spread by up to 10% (a shared core), far more than the two sides differ.

Where cbp's time goes: ``--profile CASE --steps 50`` (cProfile, which inflates Python-level
costs), the quantize cases, which carry every extra cbp has (both sides do the step, the penalty
pass and the evaluation; these are the parts only cbp's loop does), seconds of ``fit``:

    part of fit (cbp only)                     ResNet-20 quantize, 29.4 s   GPT quantize, 18.8 s
    OscillationTracker.step, 50 calls          0.187 s (0.6%)              0.537 s (2.9%)
    checkpoint writes (_save), 2 epochs        0.140 s (0.5%)              0.172 s (0.9%)
    metrics.report, 2 epochs                   0.030 s                     0.092 s (0.5%)
    batches via make_loader (_epoch_batches)   0.091 s                     0.037 s
    tqdm update + set_postfix, 50 steps        0.023 s                     0.022 s
    _finite, weight_histogram, append_row      0.014 s                     0.014 s
    per-step NaN flag and _poll                not among the top entries (< 0.01 s)

The step dominates: ``backward`` 16.5 s / 9.6 s, ``Lagrangian.step`` 0.76 s / 2.17 s (its eager
penalty pass, ``torch.where`` 0.20 s / 0.91 s), evaluation 2.87 s / 0.18 s. cbp's extras add up
to ~1% (ResNet-20) and ~4.5% (GPT, profiled; the unprofiled ratio is 1.006) of the loop, most of
it the oscillation tracker, which the plain loop does not have. Pretraining (not profiled) has
no tracker and no ``metrics.report``: its extras are the checkpoints, bars and loader, each
under 1% above. Nothing in the loop
needs removing for cbp / plain <= 1.03; what a further cut would take (in ``cbp.training.train`` and
``cbp.core.oscillation``, see the report of issue 27): the tracker's per-step pass made cheaper (one
fused pass, or compiled with the penalty pass). For runs of short epochs the checkpoints can be
spaced out with cbp's ``--checkpoint-every SECONDS`` (flags after ours go to cbp: ``--case
gpt-quantize --steps 20 --epochs 20 --without checkpoint --checkpoint-every 3600`` gave cbp 3.36 s,
cbp without any checkpoint 3.34 s, plain 2.79 s on both cores here).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import pstats
import statistics
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cbp.cli import training as cli_training
from cbp.cli.options import parse_args
from cbp.core.oscillation import OscillationTracker
from cbp.training import train
from cbp.training.train import Run, fit
from cbp.zoo.tasks import LanguageModel

CASES = {  # name: the CLI command it times (before the size flags)
    "resnet20-pretrain": ["pretrain", "--config", "demo"],
    "resnet20-quantize": ["quantize", "--config", "demo", "--model", "resnet20"],
    "gpt-pretrain": ["pretrain", "--config", "gpt"],
    "gpt-quantize": ["quantize", "--config", "gpt", "--model", "gpt"],
}
VAL_LIMIT = {"resnet20": 1000}   # the GPT configs set their own (200 and 16 windows)

# cbp's extras, each replaced by nothing for a "cbp without PART" side (--without): what it costs
WITHOUT = {
    "checkpoint": lambda: mock.patch.object(train, "_save", lambda *args: None),
    "tracker": lambda: mock.patch.object(OscillationTracker, "step", lambda self: None),
    "report": lambda: mock.patch.object(train.metrics, "report", lambda model: {}),
    "histogram": lambda: mock.patch.object(train, "weight_histogram",
                                           lambda model, layer, epoch: {}),
    "poll": lambda: mock.patch.object(train, "poll", lambda stop, bad, world: (0, -1)),
    "bars": lambda: mock.patch.object(train, "tqdm",
                                      lambda *a, **k: tqdm(*a, **{**k, "disable": True})),
}


def plain_fit(run: Run, resume: bool = False) -> list[dict]:
    """The loop a user would write for the same work: steps, CBP's calls, an evaluation per epoch."""
    model, optimizer, lagrangian = run.model, run.optimizer, run.lagrangian
    loader = DataLoader(run.train_data, batch_size=run.batch_size, shuffle=True, drop_last=True)
    steps = run.epoch_iters or len(loader)
    if lagrangian is not None:
        lagrangian.plan(run.epochs * steps)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))   # passes, back to back
    device = next(model.parameters()).device
    for _ in range(run.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for x, y in itertools.islice(batches, steps):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            loss.backward()
            if lagrangian is None:
                optimizer.step()
            else:
                lagrangian.step()
            loss_sum += loss.detach()
        if run.scheduler is not None:
            run.scheduler.step()
        if lagrangian is not None:
            lagrangian.end_epoch(loss_sum)
        plain_evaluate(run)
        if lagrangian is not None and lagrangian.finished:
            break
    return []


@torch.no_grad()
def plain_evaluate(run: Run) -> float:
    """Validation loss (and top-1 for a classifier) in cbp's evaluation batches."""
    run.model.eval()
    language = run.task is LanguageModel
    loss = hits = 0.0
    device = next(run.model.parameters()).device
    for x, y in DataLoader(run.val_data, batch_size=64 if language else 500):
        x, y = x.to(device), y.to(device)
        out = run.model(x)
        loss += float(F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum"))
        if not language:
            hits += float((out.argmax(1) == y).sum())
    return loss


def case_argv(case: str, steps: int, epochs: int, out: str, extra: list[str]) -> list[str]:
    model = case.split("-")[0]
    argv = CASES[case] + ["--epochs", str(epochs), "--epoch-iters", str(max(1, steps // epochs)),
                          "--out", out]
    if model in VAL_LIMIT:
        argv += ["--val-limit", str(VAL_LIMIT[model])]
    return argv + extra


def time_side(case: str, side: str, steps: int, epochs: int, extra: list[str],
              profile: cProfile.Profile | None = None) -> float:
    """Seconds of one side's loop for ``case``, in a run the CLI builds (setup and plots untimed).

    ``side``: "plain", "cbp", or "cbp without A+B" (those parts of ``WITHOUT`` made no-ops)."""
    loop = plain_fit if side == "plain" else fit
    parts = side.split(" without ")[1].split("+") if " without " in side else []
    seconds = []

    def timed(run: Run, resume: bool = False) -> list[dict]:
        tic = time.perf_counter()
        if profile is not None:
            profile.enable()
        rows = loop(run, resume)
        if torch.cuda.is_available():
            torch.cuda.synchronize()   # the GPU's queue drained: the loop's whole time
        if profile is not None:
            profile.disable()
        seconds.append(time.perf_counter() - tic)
        return rows

    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as patches:
        args = parse_args(case_argv(case, steps, epochs, f"{out}/run", extra))
        patches.enter_context(mock.patch.object(cli_training, "fit", timed))
        patches.enter_context(mock.patch.object(cli_training, "plot_run", lambda d: None))
        for part in parts:
            patches.enter_context(WITHOUT[part]())
        cli_training.run_training(args)
    return seconds[0]


def compare(cases: list[str], steps: int, epochs: int, repeat: int,
            extra: list[str] = (), without: list[str] = ()) -> dict:
    """Per case: each side's seconds (alternated cbp, plain, [cbp without ...], cbp, ...) and
    median(cbp)/median(plain); ``ratios`` has every side's median over plain's."""
    results = {}
    for case in cases:
        times = {"cbp": [], "plain": [], **{f"cbp without {w}": [] for w in without}}
        for _ in range(repeat):
            for side in times:
                times[side].append(time_side(case, side, steps, epochs, list(extra)))
        plain = statistics.median(times["plain"])
        ratios = {side: statistics.median(t) / plain for side, t in times.items()}
        results[case] = {**times, "ratio": ratios["cbp"], "ratios": ratios}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=list(CASES), action="append",
                        help="a case to run (repeatable); default all")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--epochs", type=int, default=2, help="epochs the steps are split into")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (median)")
    parser.add_argument("--profile", choices=list(CASES),
                        help="profile cbp's side of this case instead of timing both")
    parser.add_argument("--without", action="append", default=[], metavar="PART[+PART]",
                        help="also time cbp with these extras made no-ops (repeatable; parts: "
                             f"{', '.join(WITHOUT)}): what each costs")
    args, extra = parser.parse_known_args()   # the rest goes to the cbp command
    for parts in args.without:
        if unknown := set(parts.split("+")) - set(WITHOUT):
            parser.error(f"--without: unknown part(s) {', '.join(sorted(unknown))}")
    if args.profile:
        if "cuda" in extra:   # CUDA's start and cuDNN's first choices happen outside the profile
            time_side(args.profile, "cbp", args.steps, args.epochs, extra)
        profile = cProfile.Profile()
        time_side(args.profile, "cbp", args.steps, args.epochs, extra, profile)
        stats = pstats.Stats(profile, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"(cbp|tqdm)/", 60)   # the loop's own parts
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.steps} steps "
          f"in {args.epochs} epochs, {args.repeat} runs per side, alternated")
    print(f"{'case':20} {'cbp s (median)':>15} {'plain s (median)':>17} {'cbp/plain':>10}")
    for case in args.case or list(CASES):   # each row as soon as its case is measured
        r = compare([case], args.steps, args.epochs, args.repeat, extra, args.without)[case]
        print(f"{case:20} {statistics.median(r['cbp']):15.2f} "
              f"{statistics.median(r['plain']):17.2f} {r['ratio']:10.3f}"
              f"   cbp {' '.join(f'{s:.2f}' for s in r['cbp'])},"
              f" plain {' '.join(f'{s:.2f}' for s in r['plain'])}", flush=True)
        for side in args.without:
            side = f"cbp without {side}"
            print(f"  {side:35} {statistics.median(r[side]):8.2f} s, / plain "
                  f"{r['ratios'][side]:.3f}   runs {' '.join(f'{s:.2f}' for s in r[side])}",
                  flush=True)


if __name__ == "__main__":
    main()
