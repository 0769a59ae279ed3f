"""How far a prepared model's weights are from their levels, and how alike two networks predict.

A prepared layer holds two weights: the latent float weight ``w`` (``layer.weight``, what training
updates) and ``Q(w)``, the nearest level, which its forward uses. ``cfs``, ``fraction_on_levels``
and ``layer_stats`` describe the latent ``w``: how far CBP still is from putting every weight on
its level, i.e. how much ``cbp.convert`` or the export would snap. They say nothing about the
network that runs: that one computes with ``Q(w)`` on its levels by construction, which is why a
model with no quantized layer (``cbp.convert``'s output, a float model) has no score and raises.

For the network that actually runs, measure its outputs: its top-1, and ``agreement(a, b, batches)``
- how often two networks predict the same class, and their largest logit gap. Against the float
model it started from it says what quantization changed; against ``cbp.convert(model)``, an
onnxruntime session's wrapper or ``cbp.load_packed``'s model it checks that a deployed copy
computes what was trained (same predictions, gap ~0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .constraint import quantize, sawtooth
from .layers import distinct_quantized_layers


@torch.no_grad()
def layer_stats(model: nn.Module, tolerance: float = 0.01) -> list[dict]:
    """Per quantized layer: name, weights, scale, CFS, mean |w - Q(w)| / scale, fraction on a level.

    A weight is on a level when ``|w - Q(w)| <= tolerance * scale``. With per-channel scales each
    weight is measured against its own channel's levels and scale, and ``scale`` is their mean.
    """
    rows = []
    for name, layer in distinct_quantized_layers(model).items():  # a tied weight counts once
        w, levels = layer.weight.detach(), layer.levels
        distance = (w - quantize(w, levels)).abs()
        scale = layer.cbp_scale.double()   # 0-d, or (out, 1, ...): each weight's own
        rows.append({
            "layer": name,
            "weights": w.numel(),
            "scale": float(scale.mean()),
            "cfs": float(sawtooth(w, levels).double().mean()),
            "mean_distance": float((distance.double() / scale).mean()),
            "on_levels": float((distance <= tolerance * scale).double().mean()),
        })
    return rows


def _weighted(rows: list[dict], key: str, what: str) -> float:
    """The weight-count-weighted mean of ``key``; a model with no quantized layer has none."""
    if not rows:
        raise ValueError(f"{what}: the model has no quantized layer; it describes the latent "
                         "weights of a model from cbp.prepare (cbp.convert's output is on its "
                         "levels by construction: compare its outputs with cbp.agreement)")
    return sum(r[key] * r["weights"] for r in rows) / sum(r["weights"] for r in rows)


def cfs(model: nn.Module) -> float:
    """Constraint-failure score, paper Eq. 19: ``(1/n_w) sum_i Y(w_i)`` over quantized weights.

    Of the latent float weights ``layer.weight`` (0 once every one sits on a level); ValueError
    for a model with no quantized layer.
    """
    return _weighted(layer_stats(model), "cfs", "cfs")


def fraction_on_levels(model: nn.Module, tolerance: float = 0.01) -> float:
    """Fraction of latent quantized weights within ``tolerance * scale`` of their nearest level.

    ValueError for a model with no quantized layer.
    """
    return _weighted(layer_stats(model, tolerance), "on_levels", "fraction_on_levels")


def report(model: nn.Module) -> dict[str, float]:
    """The figures of a prepared model that every epoch's log row and ``cbp evaluate`` show.

    A new metric added here reaches both. ValueError for a model with no quantized layer.
    """
    rows = layer_stats(model)
    return {"cfs": _weighted(rows, "cfs", "cfs"),
            "on_levels": _weighted(rows, "on_levels", "fraction_on_levels")}


@dataclass(frozen=True)
class Agreement:
    """How alike two networks' outputs are over the same inputs (see :func:`agreement`)."""

    samples: int
    same_top1: int                     # inputs on which both predict the same class
    max_logit_gap: float               # largest |output_a - output_b| over inputs and classes
    correct: tuple[int, int] | None    # top-1 hits of a and of b, when the batches hold labels

    @property
    def fraction(self) -> float:
        """Share of inputs with the same top-1 prediction."""
        return self.same_top1 / self.samples


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _inputs_and_labels(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable) -> Agreement:
    """Run both models in eval mode on every batch and compare their outputs.

    ``batches`` yields input tensors or ``(inputs, labels, ...)`` tuples (a DataLoader); each model
    gets them on its own device. The models' train/eval modes are restored afterwards.
    """
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    samples = same = hits_a = hits_b = 0
    gap, labelled = 0.0, True
    try:
        for batch in batches:
            x, y = _inputs_and_labels(batch)
            a = model_a(x.to(_device(model_a))).float().cpu()
            b = model_b(x.to(_device(model_b))).float().cpu()
            if a.shape != b.shape:
                raise ValueError(f"agreement: the models give outputs of shapes "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
            if not len(a):
                continue
            samples += len(a)
            same += int((a.argmax(1) == b.argmax(1)).sum())
            gap = max(gap, float((a - b).abs().max()))
            labelled = labelled and y is not None
            if labelled:
                hits_a += int((a.argmax(1) == y.cpu()).sum())
                hits_b += int((b.argmax(1) == y.cpu()).sum())
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if not samples:
        raise ValueError("agreement: no inputs (the batches were empty)")
    return Agreement(samples, same, gap, (hits_a, hits_b) if labelled else None)
