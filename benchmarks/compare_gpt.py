"""Ternary and binary transformers: the low-bit methods on a character-level GPT (Shakespeare).

    python benchmarks/compare_gpt.py --jobs 2 --out benchmarks/RESULTS-gpt.md   # ~12 min, 2 cores
    python benchmarks/compare_gpt.py --quick                                     # ~1 min
    python benchmarks/compare_gpt.py --tune --levels ternary     # choose CBP's eta_lambda
    python benchmarks/compare_gpt.py --levels ternary --methods fp,ste,cbp --multiplier-lr ETA \
        --budget 4                                               # STE-only vs CBP at 4x the steps
    python benchmarks/compare_gpt.py --recipes --multiplier-lr ETA \
        --results benchmarks/results/gpt.jsonl                   # distillation, per-channel scales

Every method starts from one pretrained GPT (``cbp pretrain --config gpt``, made if missing and
then reused) and, per level set and seed:

  fp          the pretrained checkpoint itself (reference; one checkpoint, so no spread)
  rounding    nearest level with a = mean|W| in every block Linear, no training
  ste         STE-only fine-tuning: ``CBPConfig(use_constraint=False)``
  cbp         CBP with the window schedule g = 1, 2, ..., 10, 20, ..., 100, 200
  X+kd, X+pc  method X with distillation from the float checkpoint (``cbp.Distillation``'s
              default alpha and temperature) / per-output-channel scales (``--recipes``)

Quantized: every Linear inside the blocks (``cbp.zoo.gpt.CBP_SELECTION``); the embeddings and the tied
output head stay float. Equal budget: STE-only and CBP run the same epochs of ``epoch_iters`` steps
on the same windows (seed), with the same Adam, lr and clipping, the lr x0.1 at the epoch where
CBP's g reaches 20. The numbers come from one evaluation of ``test_windows`` validation windows
at the end: loss in nats per character and bits per character (bpc), mean ± standard error over
seeds, and the paired difference CBP - STE-only with a paired t-test, Holm-corrected over the
table (``paired.py``). With ``--results FILE`` every cell is merged into a JSON-lines file as it
finishes, keyed by its settings and code version (cells already there are not recomputed;
``--cached`` rebuilds the table from the file alone). CBP's eta_lambda is chosen with ``--tune``
on a separate tuning split: the last ``tune_windows`` validation windows, disjoint from the
reported first ``test_windows``, and with other seeds than the reported ones. ``--budget k``
makes every epoch k times longer (the ladder of ``ladder.py``: same g path, k times the steps).

No torchao row: torchao's QAT fake quantizer (``IntxFakeQuantizeConfig``) offers torch.int1
and torch.int2, whose integer grids are {-1, 0} and {-2, -1, 0, 1} - neither is the symmetric
ternary {-a, 0, a} nor the binary {-a, a}, so there is no matching peer to run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from multiprocessing import get_context

import torch
from safetensors.torch import save_file
from torch.utils.data import Subset
from tqdm import tqdm

import cbp
from cbp.core.distributed import setup
from cbp.training.runs import load_model
from cbp.training.train import Run, fit
from cbp.zoo.gpt import CBP_SELECTION, generate
from cbp.zoo.tasks import LanguageModel
from cbp.zoo.text import CharVocab, load_text, shakespeare_dir

_spec = importlib.util.spec_from_file_location(
    "bench_compare", os.path.join(os.path.dirname(__file__), "compare.py"))
compare = sys.modules["bench_compare"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(compare)
from common import publish  # noqa: E402  (benchmarks/, put on the path by compare.py)
from paired import holm, paired  # noqa: E402

METHODS = ("fp", "rounding", "ste", "cbp")
LABELS = {"fp": "full precision (pretrained)", "rounding": "post-training rounding",
          "ste": "STE-only fine-tuning", "cbp": "CBP (window schedule)"}
# Toward full precision (issue 23): {none, distillation, per-channel, both} x {STE-only, CBP}
VARIANTS = ("ste+kd", "ste+pc", "ste+kd+pc", "cbp+kd", "cbp+pc", "cbp+kd+pc")
RECIPES = ("fp", "ste", "cbp", *VARIANTS)
LEVELS = ("ternary", "binary")
PROMPT, SAMPLE_CHARS, SAMPLE_SEED = "ROMEO:", 300, 0  # the text samples of seed 0's models


@dataclass(frozen=True)
class Size:
    train_windows: int | None  # first N training windows of 128 characters (None: all)
    val_windows: int           # validation windows evaluated after every epoch (monitoring only)
    test_windows: int          # validation windows of the final evaluation
    batch: int
    epoch_iters: int
    lr: float
    multiplier_lr: float       # eta_lambda
    p_max: int
    stop_once_g_exceeds: float
    seeds: int
    tune_windows: int          # the last validation windows: the split eta_lambda is chosen on
    budget: int = 1            # epochs of budget * epoch_iters steps


FULL = Size(train_windows=None, val_windows=16, test_windows=1000, batch=16, epoch_iters=20,
            lr=1e-3, multiplier_lr=1e-2, p_max=1, stop_once_g_exceeds=100, seeds=3,
            tune_windows=1000)
QUICK = Size(train_windows=2000, val_windows=4, test_windows=32, batch=8, epoch_iters=2,
             lr=1e-3, multiplier_lr=1e-2, p_max=1, stop_once_g_exceeds=10, seeds=2,
             tune_windows=32)
TUNE_ETAS = (1e-4, 1e-3, 1e-2)
TUNE_SEED = 100   # the tuning runs' seed: none of the reported seeds 0, 1, ...


def cbp_config(size: Size, levels: str, method: str) -> cbp.CBPConfig:
    # compile_penalty off: compiling costs more than it saves on these short CPU runs
    base = cbp.CBPConfig(levels=levels, multiplier_lr=size.multiplier_lr, p_max=size.p_max,
                         stop_once_g_exceeds=size.stop_once_g_exceeds, compile_penalty=False,
                         **CBP_SELECTION)
    if method == "cbp":
        return base
    # STE-only takes CBP's lr drop from a MultiStepLR, and never "finishes".
    return replace(base, use_constraint=False, lr_drop_at_g=None, stop_once_g_exceeds=None)


@lru_cache(maxsize=1)
def datasets(size: Size, data_dir: str | None):
    """Training windows, the monitoring and reported validation windows (the first ones), and
    the tuning windows (the last ones), which never overlap the reported ones."""
    directory = shakespeare_dir(data_dir)
    train = load_text(directory, True, 128, size.train_windows)
    val = load_text(directory, False, 128)
    if size.test_windows + size.tune_windows > len(val):
        raise ValueError(f"{size.test_windows} reported + {size.tune_windows} tuning windows do not "
                         f"fit in the {len(val)} validation windows without overlapping")
    tune = Subset(val, range(len(val) - size.tune_windows, len(val)))
    return train, Subset(val, range(size.val_windows)), Subset(val, range(size.test_windows)), tune


def pretrained(checkpoint: str, data_dir: str | None) -> str:
    """The shared checkpoint: ``cbp pretrain --config gpt`` once, then reused."""
    if not os.path.exists(checkpoint):
        cmd = [sys.executable, "-m", "cbp", "pretrain", "--config", "gpt", "--quiet", "--resume",
               "--out", os.path.dirname(checkpoint)] + (["--data-dir", data_dir] if data_dir else [])
        subprocess.run(cmd, check=True)
    return checkpoint


def file_sizes(model: torch.nn.Module) -> dict:
    """Bytes of the packed export and of a float32 safetensors file of the same state_dict."""
    with tempfile.TemporaryDirectory() as tmp:
        packed = os.path.getsize(cbp.export(model, os.path.join(tmp, "packed.safetensors")))
        plain = cbp.convert(model)
        float_path = os.path.join(tmp, "float.safetensors")
        save_file({k: v.detach().clone().float() for k, v in plain.state_dict().items()}, float_path)
        return {"packed_bytes": packed, "float_bytes": os.path.getsize(float_path)}


def run_one(size: Size, checkpoint: str, cache: str, data_dir: str | None, method: str,
            levels: str, seed: int, split: str = "test") -> dict:
    """One cell: train (or not) from the checkpoint, then evaluate on the reported windows
    (``split="test"``) or on the tuning windows (``"tune"``)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, val, test, tune = datasets(size, data_dir)
    ctx = setup("cpu")
    model, meta = load_model(checkpoint)
    result = {"method": method, "levels": levels, "seed": seed, "sec_per_step": None,
              "budget": size.budget, "multiplier_lr": size.multiplier_lr, "split": split}
    method, *modifiers = method.split("+")   # the base method; "kd" / "pc" variants (VARIANTS)
    distillation = cbp.Distillation(load_model(checkpoint)[0]) if "kd" in modifiers else None
    if method != "fp":
        config = cbp_config(size, levels, method)
        if "pc" in modifiers:
            config = replace(config, scale="per-channel")
        cbp.prepare(model, config)
    if method in ("ste", "cbp"):
        epochs, drop = compare.schedule_epochs(cbp_config(size, levels, "cbp"))
        optimizer = torch.optim.AdamW(cbp.param_groups(model, 0.0), lr=size.lr, betas=(0.9, 0.99))
        scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, [drop] if drop else [], 0.1)
                     if method == "ste" else None)
        rows = fit(Run(model=model, optimizer=optimizer, train_data=train, val_data=val,
                       out_dir=os.path.join(cache, "runs", f"{result['method']}-{levels}-{seed}-"
                                            f"{size.budget}x-{size.multiplier_lr:g}"),
                       epochs=epochs, batch_size=size.batch, ctx=ctx,
                       lagrangian=cbp.Lagrangian(model, config, optimizer), scheduler=scheduler,
                       epoch_iters=size.epoch_iters * size.budget, seed=seed, show_progress=False,
                       task=LanguageModel, distillation=distillation))
        result["sec_per_step"] = statistics.median(r["seconds"] / r["steps"] for r in rows)
        result.update(g=rows[-1].get("g"), epochs=len(rows))
    if method != "fp":
        result.update(cfs=cbp.cfs(model), on_levels=cbp.fraction_on_levels(model))
        if seed == 0:
            result.update(file_sizes(model))
    result.update(LanguageModel.evaluate(model, tune if split == "tune" else test, ctx))
    if seed == 0 and split == "test":
        vocab = CharVocab(meta["vocab"])
        tokens = generate(model, vocab.encode(PROMPT)[None], SAMPLE_CHARS, seed=SAMPLE_SEED)
        result["sample"] = vocab.decode(tokens[0])
    return result


def cells(size: Size, methods, levels) -> list[tuple[str, str, int]]:
    out = [("fp", "-", 0)] if "fp" in methods else []
    out += [("rounding", lv, 0) for lv in levels if "rounding" in methods]  # no randomness
    return out + [(m, lv, s) for m in methods if m not in ("fp", "rounding") for lv in levels
                  for s in range(size.seeds)]


@lru_cache(maxsize=1)
def code_version() -> dict:
    """``compare.code_version`` (every cbp source, the device, torch) plus the source of the
    functions here that compute a cell: a cell of another version is recomputed, never mixed."""
    source = "".join(inspect.getsource(f) for f in (run_one, cbp_config, datasets, file_sizes))
    return {**compare.code_version(), "gpt": hashlib.sha256(source.encode()).hexdigest()[:12]}


def settings_of(size: Size) -> dict:
    """What a cell's numbers depend on in ``size`` (the seed count is not part of a cell)."""
    return {k: v for k, v in asdict(size).items() if k != "seeds"}


def cell_key(size: Size) -> str:
    """The key of a cell's settings and code version."""
    text = json.dumps({"size": settings_of(size), "version": code_version()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_all(size: Size, checkpoint: str, cache: str, data_dir: str | None, methods, levels,
            jobs: int, results_file: str | None = None) -> list[dict]:
    todo = [(size, *t, "test") for t in cells(size, methods, levels)]
    return _run(todo, checkpoint, cache, data_dir, jobs, results_file)


def tune(size: Size, checkpoint: str, cache: str, data_dir: str | None, levels,
         jobs: int, results_file: str | None = None) -> list[dict]:
    """CBP at every eta of ``TUNE_ETAS``, seed ``TUNE_SEED``, scored on the tuning windows."""
    todo = [(replace(size, multiplier_lr=eta), "cbp", lv, TUNE_SEED, "tune")
            for lv in levels for eta in TUNE_ETAS]
    return _run(todo, checkpoint, cache, data_dir, jobs, results_file)


def _run(todo: list[tuple], checkpoint: str, cache: str, data_dir: str | None,
         jobs: int, results_file: str | None = None) -> list[dict]:
    """Every cell of ``todo``; those already in ``results_file`` under the same key are read,
    the others computed and merged into it one by one as they finish."""
    known = {(r["key"], *compare.task_of(r)): r for r in compare.read_results(results_file)}
    results, missing, order = {}, [], []
    for size, method, lv, seed, split in todo:
        cell = (cell_key(size), method, lv, seed)
        order.append(cell)
        if (cell[0], "gpt", *cell[1:]) in known:
            results[cell] = known[(cell[0], "gpt", *cell[1:])]
        else:
            missing.append((cell, size, split))
    with tqdm(total=len(missing), desc="cells (method, level set, seed)", unit="cell") as bar:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, size, checkpoint, cache, data_dir, *cell[1:], split):
                       (cell, size) for cell, size, split in missing}
            for future in as_completed(futures):
                cell, size = futures[future]
                results[cell] = {**future.result(), "model": "gpt", "key": cell[0],
                                 "version": code_version(), "settings": settings_of(size)}
                if results_file:
                    compare.save_results(results_file, [results[cell]])
                bar.update()
    return [results[cell] for cell in order]


def committed(results_file: str, size: Size, methods, levels) -> list[dict]:
    """The cells of a results file for this size's settings, whatever code version computed
    them; cells of two versions are refused (``compare.committed``'s rule)."""
    wanted = set(cells(size, methods, levels))
    rows = [r for r in compare.read_results(results_file)
            if (r["method"], r["levels"], r["seed"]) in wanted and r.get("split") == "test"
            and r.get("settings") == settings_of(size)]
    keys = sorted({r["key"] for r in rows})
    if len(keys) > 1:
        raise ValueError(f"cells of {len(keys)} code versions ({', '.join(keys)}) in "
                         f"{results_file}; recompute one of them")
    return rows


def tune_table(results: list[dict], size: Size) -> str:
    """The tuning runs' loss on the tuning windows, and the eta_lambda each level set takes."""
    out = ["| level set | η_λ | val loss on the tuning windows (nats/char) | CFS |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["levels"], r["multiplier_lr"])):
        out.append(f"| {r['levels']} | {r['multiplier_lr']:g} | {r['val_loss']:.4f} | {r['cfs']:.2e} |")
    for lv in sorted({r["levels"] for r in results}):
        best = min((r for r in results if r["levels"] == lv), key=lambda r: r["val_loss"])
        out.append(f"\nChosen for {lv}: η_λ = {best['multiplier_lr']:g} (seed {TUNE_SEED}, the last "
                   f"{size.tune_windows} validation windows, {size.budget}× budget).")
    return "\n".join(out) + "\n"


def _mean_se(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values) / math.sqrt(len(values)), fmt)}"


def table(results: list[dict], size: Size, levels) -> str:
    fp = [r for r in results if r["method"] == "fp"]
    out = []
    contrasts = {lv: paired([r for r in results if r["method"] == "cbp" and r["levels"] == lv],
                            [r for r in results if r["method"] == "ste" and r["levels"] == lv],
                            "val_loss") for lv in levels}
    holm(list(contrasts.values()))
    for lv in levels:
        out += [f"### {lv}", "",
                "| method | val loss (nats/char) | bits per char | CFS | on levels | packed / float32 "
                "file | s / step |", "|---|---|---|---|---|---|---|"]
        for method in METHODS:
            rows = fp if method == "fp" else [r for r in results
                                               if r["method"] == method and r["levels"] == lv]
            if not rows:
                continue
            cols = [_mean_se([r["val_loss"] for r in rows], ".4f"),
                    _mean_se([r["bpc"] for r in rows], ".4f")]
            for key, fmt in (("cfs", ".2e"), ("on_levels", ".3f")):
                cols.append(_mean_se([r[key] for r in rows if r.get(key) is not None], fmt))
            sized = [r for r in rows if "packed_bytes" in r]
            cols.append(f"{sized[0]['packed_bytes']:,} / {sized[0]['float_bytes']:,} B "
                        f"({sized[0]['float_bytes'] / sized[0]['packed_bytes']:.1f}x)" if sized else "—")
            cols.append(_mean_se([r["sec_per_step"] for r in rows if r["sec_per_step"]], ".3f"))
            out.append(f"| {LABELS[method]} | " + " | ".join(cols) + " |")
        if contrasts[lv]:
            out += ["", f"CBP − STE-only, val loss (paired): {contrasts[lv].text(4)}"]
        out.append("")
    epochs, drop = compare.schedule_epochs(cbp_config(size, "binary", "cbp"))
    out += [f"STE-only and CBP: {epochs} epochs × {size.epoch_iters * size.budget} steps of "
            f"{size.batch} windows "
            f"of 128 characters (AdamW lr {size.lr}, no weight decay, "
            f"{f'×0.1 after epoch {drop}' if drop else 'no lr drop'}); "
            f"CBP η_λ = {size.multiplier_lr}, p_max = {size.p_max}, "
            f"stop once g exceeds {size.stop_once_g_exceeds}; "
            f"{size.seeds} seeds (± is the standard error; the paired difference's verdict is "
            "Holm-corrected over the level sets). Evaluated on the first "
            f"{size.test_windows} validation windows ({size.test_windows * 128:,} characters). "
            "s / step includes the per-epoch monitoring evaluation.",
            f"Settings: `{asdict(size)}`"]
    return "\n".join(out) + "\n"


def recipes_table(results: list[dict], size: Size, lv: str = "ternary") -> str:
    """{none, distillation, per-channel, both} x {STE-only, CBP}: validation loss, its ratio to
    full precision, and the paired difference against STE-only, Holm-corrected over the table."""
    fp = [r["val_loss"] for r in results if r["method"] == "fp"]
    base = [r for r in results if r["method"] == "ste" and r["levels"] == lv]
    rows = {m: [r for r in results if r["method"] == m and r["levels"] == lv]
            for m in RECIPES if m != "fp"}
    contrasts = {m: paired(mine, base, "val_loss") for m, mine in rows.items() if m != "ste"}
    holm([c for c in contrasts.values() if c])
    out = [f"### {lv}: toward full precision", "",
           "| method | val loss (nats/char) | × full precision | Δ val loss vs STE-only | CFS |",
           "|---|---|---|---|---|"]
    if fp:
        out.append(f"| {LABELS['fp']} | {fp[0]:.4f} | 1.000 | | — |")
    for m, mine in rows.items():
        if not mine:
            continue
        losses = [r["val_loss"] for r in mine]
        ratio = f"{statistics.mean(losses) / fp[0]:.3f}" if fp else "—"
        delta = contrasts[m].text(4) if contrasts.get(m) else ""
        out.append(f"| {label(m)} | {_mean_se(losses, '.4f')} | {ratio} | {delta} | "
                   f"{_mean_se([r['cfs'] for r in mine], '.2e')} |")
    seeds = max((len(v) for v in rows.values()), default=0)
    out += ["", f"{seeds} paired seeds; Δ: paired differences (lower is better), mean ± SE, "
            "two-sided paired t-test, pairs above / below zero; **real** only after a "
            "Holm-Bonferroni correction (α 0.05) over the table. Distillation: α 0.5, T 1, the "
            "pretrained float GPT as the teacher. Per-channel: one scale per output row of each "
            f"quantized Linear. CBP η_λ = {size.multiplier_lr:g}. Code version: "
            f"{compare.one_version(results)}.", f"Settings: `{asdict(size)}`"]
    return "\n".join(out) + "\n"


def label(method: str) -> str:
    base, *modifiers = method.split("+")
    return " + ".join([LABELS[base], *(compare.MODIFIERS[m] for m in modifiers)])


def samples(results: list[dict]) -> str:
    """Markdown of seed 0's generated text per model: FP, CBP ternary and binary first."""
    order = [("fp", "-"), ("cbp", "ternary"), ("cbp", "binary"), ("ste", "ternary"),
             ("ste", "binary"), ("rounding", "ternary"), ("rounding", "binary")]
    out = [f"# {SAMPLE_CHARS} characters from each model of the GPT comparison", "",
           f"Prompt `{PROMPT}`, sampling seed {SAMPLE_SEED}, temperature 1, the seed-0 model of "
           "each row of `benchmarks/RESULTS-gpt.md` (made by `benchmarks/compare_gpt.py`).", ""]
    for method, lv in order:
        for r in results:
            if r["method"] == method and r["levels"] == lv and "sample" in r:
                name = LABELS[method] + ("" if lv == "-" else f", {lv}")
                out += [f"## {name} (val loss {r['val_loss']:.3f}, {r['bpc']:.3f} bpc)", "",
                        "```", r["sample"], "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size (about a minute)")
    p.add_argument("--seeds", type=int)
    p.add_argument("--multiplier-lr", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel worker processes")
    p.add_argument("--budget", type=int, default=1, help="every epoch this many times longer")
    p.add_argument("--tune", action="store_true",
                   help="choose eta_lambda: CBP at each of TUNE_ETAS on the tuning windows only")
    p.add_argument("--checkpoint", default="runs/gpt/pretrain/checkpoint.pt",
                   help="pretrained GPT (made with `cbp pretrain --config gpt` if missing)")
    p.add_argument("--data-dir", help="folder of the *_gut.txt texts (default: the set-up's copy)")
    p.add_argument("--cache", default="runs/bench-gpt")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--samples", help="write the generated text of every seed-0 model here")
    p.add_argument("--recipes", action="store_true",
                   help="{none, distillation, per-channel, both} x {STE-only, CBP} on ternary")
    p.add_argument("--results", help="per-seed results (JSON lines): cells already there are read, "
                   "new ones merged in as they finish")
    p.add_argument("--cached", action="store_true",
                   help="train nothing: the table from the --results file alone")
    args = p.parse_args(argv)
    if args.cached and not args.results:
        p.error("--cached needs --results FILE")
    size = QUICK if args.quick else FULL
    if args.budget < 1:
        p.error(f"--budget must be >= 1, got {args.budget}")
    overrides = {"seeds": args.seeds, "multiplier_lr": args.multiplier_lr, "lr": args.lr,
                 "budget": args.budget}
    size = replace(size, **{k: v for k, v in overrides.items() if v is not None})
    levels = [lv for lv in args.levels.split(",") if lv]
    methods = [m for m in args.methods.split(",") if m]
    if args.recipes:
        levels, methods = ["ternary"], list(RECIPES)
    unknown = sorted(set(levels) - set(LEVELS)) + sorted(set(methods) - set(METHODS + VARIANTS))
    if unknown:
        p.error(f"unknown level set or method: {', '.join(unknown)}")
    tic = time.perf_counter()
    make_table = (lambda rs: recipes_table(rs, size)) if args.recipes else (
        lambda rs: table(rs, size, levels))
    if args.cached:
        try:
            results = committed(args.results, size, methods, levels)
        except ValueError as err:
            p.error(str(err))
        publish(make_table(results), f"read from {args.results}", tic, args.out)
        return 0
    checkpoint = pretrained(args.checkpoint, args.data_dir)
    if args.tune:
        publish(tune_table(tune(size, checkpoint, args.cache, args.data_dir, levels,
                                args.jobs, args.results), size),
                f"{args.jobs} job(s)", tic, args.out)
        return 0
    results = run_all(size, checkpoint, args.cache, args.data_dir, methods, levels, args.jobs,
                      args.results)
    publish(make_table(results), f"{args.jobs} job(s) of 1 thread", tic, args.out)
    if args.samples:
        with open(args.samples, "w") as f:
            f.write(samples(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
