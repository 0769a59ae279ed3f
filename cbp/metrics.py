"""How far a prepared model's weights are from their levels.

``cfs`` is the paper's constraint-failure score (Eq. 19): the mean of ``Y(w)`` over all quantized
weights, with no window, in absolute weight units. ``layer_stats`` breaks it down per layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .constraint import quantize, sawtooth
from .layers import distinct_quantized_layers


@torch.no_grad()
def layer_stats(model: nn.Module, tolerance: float = 0.01) -> list[dict]:
    """Per quantized layer: name, weights, scale, CFS, mean |w - Q(w)| / scale, fraction on a level.

    A weight is on a level when ``|w - Q(w)| <= tolerance * scale``.
    """
    rows = []
    for name, layer in distinct_quantized_layers(model).items():  # a tied weight counts once
        w, levels = layer.weight.detach(), layer.levels
        distance = (w - quantize(w, levels)).abs()
        scale = float(layer.cbp_scale)
        rows.append({
            "layer": name,
            "weights": w.numel(),
            "scale": scale,
            "cfs": float(sawtooth(w, levels).double().mean()),
            "mean_distance": float(distance.double().mean()) / scale,
            "on_levels": float((distance <= tolerance * scale).double().mean()),
        })
    return rows


def _weighted(rows: list[dict], key: str) -> float:
    total = sum(r["weights"] for r in rows)
    return sum(r[key] * r["weights"] for r in rows) / total if total else 0.0


def cfs(model: nn.Module) -> float:
    """Constraint-failure score, paper Eq. 19: ``(1/n_w) sum_i Y(w_i)`` over quantized weights."""
    return _weighted(layer_stats(model), "cfs")


def fraction_on_levels(model: nn.Module, tolerance: float = 0.01) -> float:
    """Fraction of quantized weights within ``tolerance * scale`` of their nearest level."""
    return _weighted(layer_stats(model, tolerance), "on_levels")
