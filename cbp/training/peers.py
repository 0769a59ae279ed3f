"""Fixes for weight oscillations, as drop-in replacements for :class:`cbp.Lagrangian`.

Each is a ``Lagrangian`` (same ``step`` / ``end_epoch`` / ``state_dict``, the same g / p clock,
lr drop and stop), so a training loop, ``cbp.training.train.fit`` and the CLI (``--oscillation-fix``)
use them unchanged:

* :class:`OscillationDampening` and :class:`IterativeFreezing` are the two methods of Nagel et al.,
  "Overcoming Oscillations in Quantization-Aware Training" (ICML 2022), followed from the paper
  and its code (github.com/Qualcomm-AI-research/oscillations-qat: ``utils/qat_utils.py``
  ``DampeningLoss``, ``utils/oscillation_tracking_utils.py`` ``TrackOscillation``, and the
  defaults of ``utils/click_options.py`` / ``bash/train_mobilenetv2.sh``). Run them with
  ``use_constraint=False`` for the paper's STE peers.
* :class:`OscillationGatedCBP` is this project's variant of CBP: the multiplier pull acts only on
  weights that have been seen oscillating, so that weights travelling between levels for a
  reason are not held back. It is an option, never the default.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.config import CBPConfig
from ..core.constraint import level_values, quantize
from ..core.lagrangian import Lagrangian
from ..core.oscillation import OscillationTracker


def cosine_anneal(step: int, total: int, start: float, end: float, begin: float) -> float:
    """``start`` until ``begin * total`` steps, then cosine to ``end`` at ``total`` (Nagel et al.'s
    ``CosineTempDecay``)."""
    first = begin * total
    if step < first:
        return start
    t = min((step - first) / max(total - first, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


class OscillationDampening(Lagrangian):
    """STE (or CBP) plus Nagel et al.'s dampening term ``lambda_d(t) sum_layers R(w)``.

    ``R(w) = kernel_mean((Q(w) - clip(w, q_1, q_n))^2)`` with ``Q(w)`` held constant (their target
    is the detached quantized weight) and ``kernel_mean`` = sum over output channels, mean over the
    rest (their default aggregation). ``lambda_d`` is 0 for the first ``begin`` of ``total_steps``,
    then cosine-annealed to ``strength`` (their MobileNetV2 settings: 0 -> 0.1 from 25%). The
    gradient is added in closed form before the weight step.
    """

    def __init__(self, model: nn.Module, config: CBPConfig,
                 optimizer: torch.optim.Optimizer | None = None, *, total_steps: int,
                 strength: float = 0.1, begin: float = 0.25) -> None:
        super().__init__(model, config, optimizer)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.strength, self.begin = total_steps, strength, begin
        self.steps = 0

    def weighting(self) -> float:
        return cosine_anneal(self.steps, self.total_steps, 0.0, self.strength, self.begin)

    @torch.no_grad()
    def add_dampening_grad(self) -> None:
        """``w.grad += d (lambda_d R) / d w``: ``2 lambda_d (clip(w) - Q(w)) / (numel / out)``
        inside ``[q_1, q_n]``, 0 outside (the clip has no slope there)."""
        weighting = self.weighting()
        if weighting == 0:
            return
        for layer in self.layers.values():
            w, levels = layer.weight.detach(), layer.levels
            inside = (w >= levels[0]) & (w <= levels[-1])
            slope = 2 * weighting * (w - quantize(w, levels)) * inside / (w.numel() / w.shape[0])
            if layer.weight.grad is None:
                layer.weight.grad = torch.zeros_like(w)
            layer.weight.grad.add_(slope)

    def step(self) -> None:
        self.add_dampening_grad()
        super().step()
        self.steps += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "peer_steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps = int(state["peer_steps"])


class IterativeFreezing(Lagrangian):
    """STE (or CBP) with Nagel et al.'s iterative weight freezing.

    After every step a tracker (EMA ``momentum``, theirs 0.001) updates each weight's oscillation
    frequency; once it passes the threshold the weight is frozen, for good, on the level nearest
    the EMA of its level index (their ``use_ema_x_int``; the EMA starts when freezing does). The
    threshold is off (0) for the first ``begin`` of ``total_steps``, then cosine-annealed from
    ``threshold`` to ``final_threshold`` (their 3-bit MobileNetV2 settings: 0.1 -> 0.011 from
    25%). A frozen weight's forward is its frozen level; here its latent weight is put back on
    that level after every step, which gives the same forward.
    """

    def __init__(self, model: nn.Module, config: CBPConfig,
                 optimizer: torch.optim.Optimizer | None = None, *, total_steps: int,
                 threshold: float = 0.1, final_threshold: float = 0.011, begin: float = 0.25,
                 momentum: float = 0.001) -> None:
        super().__init__(model, config, optimizer)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.begin = total_steps, begin
        self.threshold, self.final_threshold, self.momentum = threshold, final_threshold, momentum
        self.tracker = OscillationTracker(model, momentum)
        self.frozen = {n: torch.zeros_like(i, dtype=torch.bool) for n, i in self.tracker.index.items()}
        self.frozen_index = {n: torch.zeros_like(i) for n, i in self.tracker.index.items()}
        self.ema_index: dict[str, torch.Tensor] = {}
        self.steps = 0

    def current_threshold(self) -> float:
        """0 (no freezing) before ``begin``, then the annealed threshold."""
        if self.steps < self.begin * self.total_steps:
            return 0.0
        return cosine_anneal(self.steps, self.total_steps, self.threshold, self.final_threshold,
                             self.begin)

    @torch.no_grad()
    def _pin(self) -> None:
        for name, layer in self.layers.items():
            mask = self.frozen[name]
            level = level_values(self.frozen_index[name].long(), layer.levels)
            layer.weight.copy_(torch.where(mask, level, layer.weight))

    @torch.no_grad()
    def step(self) -> None:
        super().step()
        self._pin()
        self.tracker.step()
        threshold = self.current_threshold()
        if threshold > 0:
            for name, index in self.tracker.index.items():
                if name not in self.ema_index:
                    self.ema_index[name] = index.float()
                ema = self.ema_index[name]
                new = (self.tracker.frequency[name] > threshold) & ~self.frozen[name]
                self.frozen[name] |= new
                self.frozen_index[name] = torch.where(new, ema.round().to(index.dtype),
                                                      self.frozen_index[name])
                ema.mul_(1 - self.momentum).add_(index.float(), alpha=self.momentum)
            self._pin()
        self.steps += 1

    def epoch_stats(self) -> dict:
        """The fraction of weights frozen so far (a column of ``log.jsonl``)."""
        n = sum(f.numel() for f in self.frozen.values())
        return {"frozen": float(sum(f.sum() for f in self.frozen.values())) / n}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "peer_steps": self.steps,
                "tracker": self.tracker.state_dict(),
                "frozen": {k: v.clone() for k, v in self.frozen.items()},
                "frozen_index": {k: v.clone() for k, v in self.frozen_index.items()},
                "ema_index": {k: v.clone() for k, v in self.ema_index.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps = int(state["peer_steps"])
        self.tracker.load_state_dict(state["tracker"])
        for key in ("frozen", "frozen_index"):
            for name, tensor in getattr(self, key).items():
                tensor.copy_(state[key][name])
        self.ema_index = {k: v.clone() for k, v in state["ema_index"].items()}


class OscillationGatedCBP(Lagrangian):
    """CBP whose multiplier pull acts only on weights that have oscillated (this project's variant).

    The multipliers, window and schedule are CBP's; a tracker (EMA ``momentum`` 0.01) flags a
    weight once its oscillation frequency passes ``threshold`` (0.015: two reversals less than
    ~70 steps apart) and from then on the weight feels ``lambda * d cs / d w``; unflagged
    weights train as under STE. Rationale: late CBP pins every weight outside the shrinking
    window, including weights the loss is moving to a better level; oscillating weights are the
    ones whose flips only add noise.
    """

    def __init__(self, model: nn.Module, config: CBPConfig,
                 optimizer: torch.optim.Optimizer | None = None, *, threshold: float = 0.015,
                 momentum: float = 0.01) -> None:
        if not config.use_constraint:
            raise ValueError("OscillationGatedCBP gates the constraint: use_constraint must be on")
        super().__init__(model, config, optimizer)
        self.threshold = threshold
        self.tracker = OscillationTracker(model, momentum)
        self.gate = {n: torch.zeros_like(i, dtype=torch.bool) for n, i in self.tracker.index.items()}

    def pull(self, name: str) -> torch.Tensor:
        """The multipliers of unflagged weights read as 0 (the stored ones stay)."""
        return self.multipliers[name] * self.gate[name]

    @property
    def oscillation(self) -> OscillationTracker:
        """The tracker of the gate: the loop's own (EMA 0.01 too) would count the same flips."""
        return self.tracker

    @torch.no_grad()
    def step(self) -> None:
        super().step()
        self.tracker.step()
        for name, gate in self.gate.items():
            gate |= self.tracker.frequency[name] > self.threshold

    def epoch_stats(self) -> dict:
        """The fraction of weights the pull acts on so far (a column of ``log.jsonl``)."""
        n = sum(g.numel() for g in self.gate.values())
        return {"gated": float(sum(g.sum() for g in self.gate.values())) / n}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tracker": self.tracker.state_dict(),
                "gate": {k: v.clone() for k, v in self.gate.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
        for name, gate in self.gate.items():
            gate.copy_(state["gate"][name])


OSCILLATION_FIXES = {"dampen": OscillationDampening, "freeze": IterativeFreezing,
                     "gate": OscillationGatedCBP}


def build(name: str | None, model: nn.Module, config: CBPConfig,
          optimizer: torch.optim.Optimizer | None = None, *, total_steps: int = 1,
          **options) -> Lagrangian:
    """The Lagrangian of a method: CBP's (``name`` None) or an oscillation fix of
    ``OSCILLATION_FIXES``. The fixes with a schedule over the run take ``total_steps``; ``options``
    go to the class (a freezing threshold, say)."""
    if not name:
        return Lagrangian(model, config, optimizer, **options)
    cls = OSCILLATION_FIXES[name]
    if cls is OscillationGatedCBP:   # the gate follows the oscillations, not a schedule
        return cls(model, config, optimizer, **options)
    return cls(model, config, optimizer, total_steps=total_steps, **options)
