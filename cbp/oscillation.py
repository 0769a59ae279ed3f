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

from .layers import quantized_layers

LATE_FRACTION = 0.25   # "late" flips: in the last quarter of the steps so far


def level_index(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int8) of each weight's nearest level; an exact midpoint goes down, as ``quantize``."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = torch.zeros(w.shape, dtype=torch.int8, device=w.device)
    for mid in midpoints:
        index += w > mid
    return index


class OscillationTracker:
    """Flips, oscillations (Nagel et al.) and level changes of every quantized weight.

    Call :meth:`step` after each optimizer step and :meth:`epoch_stats` once per epoch. ``momentum``
    is the EMA factor of the oscillation frequency (0.01 is the default of Nagel et al.'s tracker:
    a memory of about 100 steps).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.01) -> None:
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError("the model has no quantized layer; call cbp.prepare(model, config) first")
        self.momentum = momentum
        self.index = {n: self._current(layer) for n, layer in self.layers.items()}
        self.start = {n: i.clone() for n, i in self.index.items()}
        self.direction = {n: torch.zeros_like(i) for n, i in self.index.items()}
        self.frequency = {n: torch.zeros(i.shape, device=i.device) for n, i in self.index.items()}
        # number (1, 2, ...) of the step of each weight's last flip; 0: never flipped
        self.last_flip = {n: torch.zeros(i.shape, dtype=torch.int32, device=i.device)
                          for n, i in self.index.items()}
        self.steps = 0
        device = next(iter(self.index.values())).device
        self._counts = torch.zeros(2, dtype=torch.int64, device=device)  # flips, oscillations
        self._epoch_steps = 0

    @staticmethod
    def _current(layer) -> torch.Tensor:
        return level_index(layer.weight.detach(), layer.levels)

    @property
    def numel(self) -> int:
        return sum(i.numel() for i in self.index.values())

    @torch.no_grad()
    def step(self) -> None:
        """Compare every weight's level with the last step's; update the counts (no device sync)."""
        for name, layer in self.layers.items():
            now = self._current(layer)
            change = torch.sign(now - self.index[name])         # -1, 0, +1 (int8)
            flipped = change != 0
            oscillated = (change * self.direction[name]) == -1  # reverses this weight's last flip
            self.frequency[name].mul_(1 - self.momentum).add_(oscillated, alpha=self.momentum)
            self.direction[name] = torch.where(flipped, change, self.direction[name])
            self.last_flip[name].masked_fill_(flipped, self.steps + 1)
            self.index[name] = now
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
        late_after = (1 - LATE_FRACTION) * self.steps
        n = self.numel
        stats = {
            "flips_per_step": flips / steps,
            "oscillations_per_step": oscillations / steps,
            "oscillation_frequency": float(sum(f.double().sum() for f in self.frequency.values())) / n,
            "late_flippers": float(sum((t > late_after).sum() for t in self.last_flip.values())) / n,
            "level_changes": float(sum((self.index[k] != self.start[k]).sum()
                                       for k in self.index)) / n,
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
