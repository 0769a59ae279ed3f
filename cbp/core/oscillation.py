"""Level flips and oscillations of the quantized weights, counted after every step.

Under straight-through training a weight near a threshold can flip between two levels step after
step: the rounded network the BatchNorm statistics were collected on is then not the one that is
deployed. Nagel et al., "Overcoming Oscillations in Quantization-Aware Training" (ICML 2022, and
their code ``utils/oscillation_tracking_utils.py``) call a flip an *oscillation* when it goes the
opposite way to the same weight's previous flip, and follow each weight's oscillation frequency as
an exponential moving average ``f = m * oscillated + (1 - m) * f``. With two levels (binary) every
flip after a weight's first is an oscillation; with three or more, a weight can travel.

:class:`OscillationTracker` keeps per weight its level index, last flip direction, EMA frequency,
the step of its last flip and its level at the start: about 11 bytes per weight and one pass over
the weights per step, cheap enough to stay on in every run (``benchmarks/compare.py`` measures it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .constraint import level_index
from .layers import quantized_layers

__all__ = ["OscillationTracker", "level_index"]

LATE_FRACTION = 0.25   # "late" flips: in the last quarter of the steps so far


class OscillationTracker:
    """Flips, oscillations (Nagel et al.) and level changes of every quantized weight.

    Call :meth:`step` after each optimizer step and :meth:`epoch_stats` once per epoch. ``momentum``
    is the EMA factor of the oscillation frequency (0.01 is the default of Nagel et al.'s tracker:
    a memory of about 100 steps). The state lives in flat tensors over all layers, so a step is a
    dozen tensor operations however many layers there are; ``index``, ``frequency`` etc. are
    per-layer views of them (shaped like the weights).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.01) -> None:
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError("the model has no quantized layer; call cbp.prepare(model, config) first")
        factors = {tuple(layer.cbp_factors.tolist()) for layer in self.layers.values()}
        if len(factors) != 1:
            raise ValueError("the quantized layers use different level sets")
        self.momentum = momentum
        first = next(iter(self.layers.values()))
        self._factors = first.cbp_factors.to(first.weight.dtype)
        self._scale = torch.cat([layer.cbp_scale.to(layer.weight.dtype).expand_as(layer.weight)
                                 .reshape(-1) for layer in self.layers.values()])  # per weight
        index = self._current()
        device = index.device
        self._flat = {"index": index, "start": index.clone(), "direction": torch.zeros_like(index),
                      "frequency": torch.zeros(index.shape, device=device),
                      # number (1, 2, ...) of the step of each weight's last flip; 0: never
                      "last_flip": torch.zeros(index.shape, dtype=torch.int32, device=device)}
        sizes = [layer.weight.numel() for layer in self.layers.values()]
        for key, flat in self._flat.items():   # self.index[name] etc.: views into the flat state
            setattr(self, key, {name: part.view(layer.weight.shape) for (name, layer), part in
                                zip(self.layers.items(), flat.split(sizes))})
        self.steps = 0
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)  # flips, oscillations
        self._epoch_steps = 0

    def _current(self) -> torch.Tensor:
        w = torch.cat([layer.weight.detach().reshape(-1) for layer in self.layers.values()])
        return level_index(w / self._scale, self._factors)

    @property
    def numel(self) -> int:
        return self._scale.numel()

    @torch.no_grad()
    def step(self) -> None:
        """Compare every weight's level with the last step's; update the counts (no device sync)."""
        state = self._flat
        now = self._current()
        change = torch.sign(now - state["index"])            # -1, 0, +1 (int8)
        flipped = change != 0
        oscillated = (change * state["direction"]) == -1     # reverses this weight's last flip
        state["frequency"].mul_(1 - self.momentum).add_(oscillated, alpha=self.momentum)
        state["direction"].copy_(torch.where(flipped, change, state["direction"]))
        state["last_flip"].masked_fill_(flipped, self.steps + 1)
        state["index"].copy_(now)
        self._counts += torch.stack([flipped.sum(), oscillated.sum()])
        self.steps += 1
        self._epoch_steps += 1

    @torch.no_grad()
    def epoch_stats(self) -> dict:
        """The figures of the steps since the last call, and the state so far; resets the counts.

        ``flips_per_step`` / ``oscillations_per_step``: weights that changed level / reversed their
        previous change, per step (counts); ``oscillation_frequency``: the mean EMA frequency;
        ``late_flippers``: fraction of weights whose last flip lies in the last quarter of the steps
        so far; ``level_changes``: fraction of weights on another level than at the start.
        """
        flips, oscillations = self._counts.tolist()
        steps = max(self._epoch_steps, 1)
        state, n = self._flat, self.numel
        stats = {
            "flips_per_step": flips / steps,
            "oscillations_per_step": oscillations / steps,
            "oscillation_frequency": float(state["frequency"].double().sum()) / n,
            "late_flippers": float((state["last_flip"] > (1 - LATE_FRACTION) * self.steps).sum()) / n,
            "level_changes": float((state["index"] != state["start"]).sum()) / n,
        }
        self._counts.zero_()
        self._epoch_steps = 0
        return stats

    def state_dict(self) -> dict:
        tensors = {key: {n: t.clone() for n, t in getattr(self, key).items()}
                   for key in ("index", "start", "direction", "frequency", "last_flip")}
        return {**tensors, "steps": self.steps, "counts": self._counts.clone(),
                "epoch_steps": self._epoch_steps}

    def load_state_dict(self, state: dict) -> None:
        for key in ("index", "start", "direction", "frequency", "last_flip"):
            ours = getattr(self, key)
            if set(state[key]) != set(ours):
                raise ValueError("oscillation state does not match the model's quantized layers")
            for name, tensor in ours.items():
                tensor.copy_(state[key][name])
        self.steps, self._epoch_steps = int(state["steps"]), int(state["epoch_steps"])
        self._counts.copy_(state["counts"])
