"""Does CBP win with a real training budget? The comparison at 1x, 4x and 16x the steps.

    .venv/bin/python benchmarks/ladder.py --budget 1,4,16      # train what is missing, then tables
    .venv/bin/python benchmarks/ladder.py --cached --out benchmarks/RESULTS-ladder.md \\
        --plot docs/ladder.png                                   # tables from the committed data only

The cells are ``compare.py``'s (same checkpoints, data, SGD, BN re-estimation, paired seeds) with
every CBP epoch ``k`` times longer: g, the lr drop and the stop come at the same fraction of a run
``k`` times longer, for STE-only and the peers too (they run CBP's clock). Rungs and cells:

  1x   tiny MobileNetV2 binary (primary) and ResNet-20 ternary, 10 paired seeds
  4x   the same two cells, 5 paired seeds
  16x  tiny MobileNetV2 binary, 3 paired seeds, STE-only and CBP at the paper's eta 1e-4, which
       is also the best one: it is ahead of 1e-3 at 1x and at 4x (dampening and freezing dropped
       there for time, as issue 22 allows)

Every cell is merged into ``--results`` (JSON lines, committed), keyed by its settings and code
version (``compare.code_version``): the tables are rebuilt from that file, a ladder interrupted or
left unfinished is continued in another session without recomputing, and a cell of another code
version is recomputed rather than mixed. Verdicts: paired t-test, Holm-corrected over each table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from common import add_pool_flags, publish  # noqa: E402
from paired import holm, paired  # noqa: E402

PRIMARY = ("fp", "ste", "dampen", "freeze_run", "cbp_1e-4", "cbp_1e-3")
CONTROL = ("fp", "ste", "dampen", "freeze_run", "cbp_1e-4")   # eta 1e-4 is the best there
RUNGS = {1: (("mobilenet", "binary", PRIMARY, 10), ("resnet", "ternary", CONTROL, 10)),
         4: (("mobilenet", "binary", PRIMARY, 5), ("resnet", "ternary", CONTROL, 5)),
         16: (("mobilenet", "binary", ("fp", "ste", "cbp_1e-4"), 3),)}
CONTRASTED = ("dampen", "freeze_run", "cbp_1e-4", "cbp_1e-3")


def plan(budgets, base: compare.Size = compare.FULL):
    """``(size, model, levels, methods)`` of every cell of the chosen rungs, in rung order; the
    ``--quick`` base caps the seeds at its own count."""
    cap = 10**6 if base is compare.FULL else base.seeds_primary
    return [(replace(base, budget=k, seeds_primary=min(n, cap), seeds_control=min(n, cap)),
             model, lv, methods) for k in budgets for model, lv, methods, n in RUNGS[k]]


def run(budgets, cache: str, results_file: str | None, jobs: int, cached: bool,
        base: compare.Size = compare.FULL) -> dict:
    """Every cell of the rungs (read when already computed), merged into ``results_file``;
    ``{(budget, model, levels): cells}``. Each rung's wall time is printed.

    ``cached``: train nothing; this code version's cells found in the cache are merged into
    ``results_file``, and the tables take that file's cells of whatever version they were
    computed with - one version per table (:func:`committed`)."""
    out = {}
    for size, model, lv, methods in plan(budgets, base):
        tic = time.perf_counter()
        cells = compare.run_all(size, cache, ((model, lv, methods),), methods, (lv,), (model,),
                                jobs=jobs, reuse=True, cached_only=cached,
                                known=compare.read_results(results_file))
        if results_file and cells:
            compare.save_results(results_file, cells)
        if cached and results_file:
            cells = committed(compare.read_results(results_file), size, model, lv, methods)
        print(f"{size.budget}x {model} {lv}: {len(cells)} cells, "
              f"{time.perf_counter() - tic:.0f} s", file=sys.stderr)
        out[(size.budget, model, lv)] = cells
    return out


def committed(results: list[dict], size: compare.Size, model: str, lv: str, methods) -> list[dict]:
    """A rung's cells of one model and level set from a results file (``compare.committed``)."""
    try:
        return compare.committed(results, size, ((model, lv, methods),), methods, (lv,), (model,))
    except ValueError as err:
        raise ValueError(f"{size.budget}x {model} {lv}: {err}") from None


def ladder_table(cells: dict, model: str, lv: str, key: str) -> list[str]:
    """Δ vs STE-only of ``key`` per method (rows) and budget (columns), Holm over the table."""
    budgets = sorted(k for k, m, v in cells if (m, v) == (model, lv) and cells[(k, m, v)])
    grid = {}
    for k in budgets:
        rows = cells[(k, model, lv)]
        base = compare._rows(rows, model, lv, compare.BASELINE)
        for method in CONTRASTED:
            mine = compare._rows(rows, model, lv, method)
            grid[(method, k)] = paired(mine, base, key) if mine and base else None
    holm(list(grid.values()))
    head = "| | " + " | ".join(f"{k}× ({steps(cells, k, model, lv)} steps)" for k in budgets) + " |"
    out = [head, "|---|" + "---|" * len(budgets)]
    for label, per in (("full precision", "fp"), ("STE-only (top-1)", compare.BASELINE)):
        vals = [compare._fmt([r[key] for r in compare._rows(cells[(k, model, lv)], model, lv, per)],
                             ".2f") for k in budgets]
        out.append(f"| {label} | " + " | ".join(vals) + " |")
    for method in CONTRASTED:
        if any(grid.get((method, k)) for k in budgets):
            vals = [grid[(method, k)].text() if grid.get((method, k)) else "—" for k in budgets]
            out.append(f"| Δ {compare.LABELS[method]} | " + " | ".join(vals) + " |")
    return out


def steps(cells: dict, k: int, model: str, lv: str) -> int:
    trained = [r for r in cells[(k, model, lv)] if r.get("epochs")]
    return trained[0]["epochs"] * trained[0]["steps_per_epoch"] if trained else 0


def report(cells: dict, base: compare.Size = compare.FULL) -> str:
    out = []
    pairs = sorted({(m, lv) for (_, m, lv), rows in cells.items() if rows},
                   key=lambda c: list(compare.MODELS).index(c[0]))
    for model, lv in pairs:
        for key, what in (("top1", "BN re-estimated"), ("top1_train_bn", "training BN")):
            out += [f"### {compare.MODELS[model]}, {lv}: Δ top-1 vs STE-only, {what}", "",
                    *ladder_table(cells, model, lv, key), ""]
    for (k, model, lv), rows in sorted(cells.items()):
        if not rows:
            continue
        seeds = len(compare._rows(rows, model, lv, compare.BASELINE))
        cell_seconds = sum(r["seconds"] for r in rows)
        out += [f"#### {k}×: {compare.MODELS[model]}, {lv} ({seeds} paired seeds; "
                f"{cell_seconds / 60:.0f} min of cell time on one core)", "",
                *compare.accuracy_table(rows, model, lv), "",
                *compare.oscillation_table(rows, model, lv), "",
                f"Code version: {compare.one_version(rows)}", ""]
    out += ["Δ: paired differences against STE-only, mean ± SE over seeds, two-sided paired t-test "
            "p-value, the count of pairs above / below zero; **real** only when the test survives "
            "a Holm-Bonferroni correction (α 0.05) over every contrast of its table.",
            f"Base settings (1×): `{compare.asdict(base)}`"]
    return "\n".join(out) + "\n"


def plot(cells: dict, path: str) -> None:
    """CBP and the peers minus STE-only (mean ± SE, BN re-estimated) against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(m, lv) for (_, m, lv), rows in cells.items() if rows},
                   key=lambda c: list(compare.MODELS).index(c[0]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.2), squeeze=False)
    for ax, (model, lv) in zip(axes[0], pairs):
        budgets = sorted(k for k, m, v in cells if (m, v) == (model, lv) and cells[(k, m, v)])
        for i, method in enumerate(CONTRASTED):
            xs, ys, es = [], [], []
            for k in budgets:
                rows = cells[(k, model, lv)]
                d = paired(compare._rows(rows, model, lv, method),
                           compare._rows(rows, model, lv, compare.BASELINE), "top1")
                if d:
                    xs.append(k * (1 + 0.04 * (i - 1.5)))  # side by side, not on top
                    ys.append(d.mean)
                    es.append(d.se)
            if xs:
                ax.errorbar(xs, ys, es, marker="o", capsize=3, color=f"C{i}",
                            label=compare.LABELS[method])
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlim=(min(budgets) / 1.5, max(budgets) * 1.5), xticks=budgets,
               xticklabels=[f"{k}×" for k in budgets],
               xlabel="training budget (× 950 steps)", ylabel="Δ top-1 vs STE-only (points)",
               title=f"{compare.MODELS[model]}, {lv}: BN re-estimated, mean ± SE")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the rungs
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="1,4,16", help="comma-separated rungs (of 1, 4, 16)")
    add_pool_flags(p)
    p.add_argument("--results", default="benchmarks/results/ladder.jsonl",
                   help="the committed per-seed results (JSON lines)")
    p.add_argument("--cached", action="store_true", help="tables from computed cells only")
    p.add_argument("--quick", action="store_true", help="CI size: compare.py's --quick cells")
    p.add_argument("--out", help="also write the markdown tables to this file")
    p.add_argument("--plot", help="write the PNG of Δ vs STE-only against the budget")
    args = p.parse_args(argv)
    try:
        budgets = [int(k) for k in args.budget.split(",") if k]
    except ValueError:
        p.error(f"--budget takes comma-separated integers, got {args.budget!r}")
    if not budgets or set(budgets) - set(RUNGS):
        p.error(f"--budget rungs are {sorted(RUNGS)}, got {args.budget!r}")
    tic = time.perf_counter()
    base = compare.QUICK if args.quick else compare.FULL
    cells = run(budgets, args.cache, args.results, args.jobs, args.cached, base)
    publish(report(cells, base), f"{args.jobs} worker(s) on the CPU", tic, args.out)
    if args.plot:
        plot(cells, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
