"""Pictures of a run: accuracy (or a language model's loss), CFS and g over epochs; flips and
oscillations; one layer's weights bifurcating onto levels."""

from __future__ import annotations

import os

import numpy as np

from ..zoo.tasks import Classification, task_of
from .runs import (
    CURVES_PNG,
    HIST_NAME,
    HISTOGRAMS_PNG,
    LOG_NAME,
    OSCILLATIONS_PNG,
    read_jsonl,
)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a picture is drawn: it costs
    ~0.4 s, which every ``cbp`` command (``generate``, ``evaluate``) would otherwise pay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Top-1 accuracy (validation loss for a language model), and for CBP runs the CFS (log
    scale) and g, against epochs."""
    epochs = [r["epoch"] for r in rows]
    key, label, panel = (("top1", "top-1 accuracy (%)", "validation accuracy")
                         if task_of(rows[0]) is Classification
                         else ("val_loss", "loss (nats per character)", "validation loss"))
    cbp_run = "g" in rows[0]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3 if cbp_run else 1, figsize=(13 if cbp_run else 5, 3.6),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, [r[key] for r in rows], marker=".")
    ax.set(xlabel="epoch", ylabel=label, title=panel)
    ax.grid(alpha=0.3)
    if cbp_run:
        ax = axes[0, 1]
        ax.semilogy(epochs, [max(r["cfs"], 1e-12) for r in rows], marker=".", color="C1")
        ax.set(xlabel="epoch", ylabel="CFS (paper Eq. 19)", title="constraint-failure score")
        ax.grid(alpha=0.3, which="both")
        ax = axes[0, 2]
        ax.semilogy(epochs, [r["g"] for r in rows], marker=".", color="C2", label="g")
        ax.set(xlabel="epoch", ylabel="g (window 1/g of each interval)", title="window variable g")
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_oscillations(rows: list[dict], path: str, title: str = "") -> None:
    """Per epoch: level flips and oscillations per step; late flippers and net level changes."""
    epochs = [r["epoch"] for r in rows]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(epochs, [r["flips_per_step"] for r in rows], marker=".", label="level flips")
    ax.plot(epochs, [r["oscillations_per_step"] for r in rows], marker=".",
            label="oscillations (reversed flips)")
    ax.set(xlabel="epoch", ylabel="weights per step", title="flips per step (epoch mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, label in (("level_changes", "on another level than at the start"),
                       ("late_flippers", "last flip in the last quarter of the steps so far")):
        ax.plot(epochs, [100 * r[key] for r in rows], marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="% of quantized weights", title="where the weights went")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(hists: list[dict], path: str, panels: int = 5) -> None:
    """The histogram of w / scale for one layer at ``panels`` epochs, levels marked in red."""
    picks = sorted({hists[round(i * (len(hists) - 1) / (panels - 1))]["epoch"]
                    for i in range(panels)}) if len(hists) > 1 else [hists[0]["epoch"]]
    chosen = [h for h in hists if h["epoch"] in picks]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3), squeeze=False,
                             sharey=False)
    for ax, h in zip(axes[0], chosen):
        edges = np.linspace(-h["range"], h["range"], len(h["counts"]) + 1)
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="C0")
        ax.set_yscale("log")
        for f in h["factors"]:
            ax.axvline(f, color="red", lw=1, ls="--")
        ax.set(title=f"epoch {h['epoch']}", xlabel="w / a")
    axes[0, 0].set_ylabel("weights (log)")
    fig.suptitle(f"layer {chosen[0]['layer']}: weights bifurcate onto the levels (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str) -> list[str]:
    """Write ``curves.png`` (and ``oscillations.png`` and ``histograms.png`` for quantized runs)."""
    log_path = os.path.join(run_dir, LOG_NAME)
    if not os.path.exists(log_path):
        raise ValueError(f"{run_dir} holds no {LOG_NAME}: not a cbp run directory")
    rows = read_jsonl(log_path)
    if not rows:
        raise ValueError(f"{log_path} is empty: the run has not finished an epoch yet")
    written = [os.path.join(run_dir, CURVES_PNG)]
    title = os.path.basename(os.path.abspath(run_dir))
    source = log_path
    try:   # a row without a figure the first row has: a log edited or written by something else
        plot_curves(rows, written[0], title=title)
        if "flips_per_step" in rows[0]:
            written.append(os.path.join(run_dir, OSCILLATIONS_PNG))
            plot_oscillations(rows, written[-1], title=title)
        source = os.path.join(run_dir, HIST_NAME)
        if os.path.exists(source):
            hists = read_jsonl(source)
            if hists:
                written.append(os.path.join(run_dir, HISTOGRAMS_PNG))
                plot_histograms(hists, written[-1])
    except KeyError as err:
        raise ValueError(f"{source}: a row lacks {err}, which the plots need; the log is "
                         "damaged") from None
    except TypeError as err:
        raise ValueError(f"{source}: a row holds a value of the wrong type ({err}); the log is "
                         "damaged") from None
    return written
