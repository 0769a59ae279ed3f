"""The multipliers and the schedule: everything CBP adds to an ordinary training loop.

One object holds the state of paper Algorithm 1 - a multiplier ``lambda_i >= 0`` per quantized
weight, the window variable ``g``, the epoch counter ``p`` and ``L_sum_pre`` - and
``state_dict()`` / ``load_state_dict()`` round-trip all of it, so resuming is free. A training loop
calls :meth:`Lagrangian.step` in place of ``optimizer.step()`` and :meth:`Lagrangian.end_epoch`
with the epoch's summed loss after every epoch::

    model = cbp.prepare(model, config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    for epoch in range(epochs):
        loss_sum = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            lagrangian.step()
            loss_sum += loss.detach()
        lagrangian.end_epoch(loss_sum)
        if lagrangian.finished:
            break

``L_sum`` is the loop's loss sum plus the penalty ``sum_i lambda_i cs(w_i; g)`` that
:meth:`step` sums: each term is counted in one place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .ascent import ASCENT_RULES
from .config import CBPConfig
from .constraint import constraint
from .distributed import all_reduce_mean
from .layers import distinct_quantized_layers
from .penalty import PenaltyKernel


@dataclass
class EpochEnd:
    """What :meth:`Lagrangian.end_epoch` decided."""

    lagrangian_sum: float     # L_sum of the epoch just ended (averaged over processes)
    updated: bool             # g increased and lambda updated
    g: float                  # g after the decision
    lr_dropped: bool          # the weight learning rate was multiplied by lr_drop_factor now


class Lagrangian:
    """Multipliers, window schedule and the constrained step for a prepared model."""

    def __init__(self, model: nn.Module, config: CBPConfig,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config
        self.optimizer = optimizer
        self.layers = distinct_quantized_layers(model)  # tied weights: one multiplier each
        if not self.layers:
            raise ValueError("the model has no quantized layer; call cbp.prepare(model, config) first")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        # STE-only (use_constraint off) holds no multiplier: it costs no memory over plain STE.
        self.multipliers = {name: torch.zeros_like(layer.weight, dtype=torch.float32)
                            for name, layer in self.layers.items()} if config.use_constraint else {}
        self._ascent = (ASCENT_RULES[config.multiplier_rule](list(self.multipliers.values()),
                                                             config.multiplier_lr)
                        if self.multipliers else None)
        self.g = float(config.g_init)
        self.p = 0
        self.lagrangian_sum_pre = math.inf
        self.lr_dropped = False
        self._penalty_sum = torch.zeros((), dtype=torch.float64, device=self._weights_device())
        self._kernel = PenaltyKernel(config.compile_penalty)
        if config.use_constraint and config.initial_multiplier_update:
            self.update_multipliers()

    # ---- per step -------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """``sum_i lambda_i cs(w_i; g)`` as a differentiable tensor: the reference form.

        :meth:`step` adds the same gradient in closed form, which is cheaper; use this to add the
        term to your own loss and call ``backward`` on the sum.
        """
        return sum((self.pull(name) * constraint(layer.weight, layer.levels, self.g)).sum()
                   for name, layer in self.layers.items() if name in self.multipliers)

    def pull(self, name: str) -> torch.Tensor:
        """The multipliers layer ``name``'s weights feel in the penalty: all of them here; a
        subclass may mask some (``cbp.training.peers.OscillationGatedCBP``)."""
        return self.multipliers[name]

    @property
    def oscillation(self):
        """An ``OscillationTracker`` this Lagrangian steps itself, which a training loop may log
        instead of stepping one of its own (``cbp.training.train.fit``); None here."""
        return None

    def plan(self, steps: int) -> None:
        """Announce that about ``steps`` steps follow: the automatic compile policy needs it."""
        self._kernel.plan(steps)

    @property
    def penalty_pass(self) -> str | None:
        """Which form of the penalty pass runs, and why (``cbp.core.penalty.PenaltyKernel.decision``);
        None until the automatic policy has decided."""
        return self._kernel.decision

    @torch.no_grad()
    def add_penalty_grad(self, clip: float | None = None) -> torch.Tensor:
        """Add ``lambda * d cs / d w`` to each quantized weight's ``.grad``; return the penalty value.

        Closed-form gradient of :meth:`penalty`, with no autograd graph and no device
        synchronisation; one fused pass per layer once compiled (see :mod:`cbp.core.penalty`). With
        ``clip``, each of these gradients is then clipped to ``[-clip, clip]`` in the same pass,
        as :meth:`step` clips every gradient.
        """
        self._kernel.start_step(self._penalty_sum.device)
        layers = list(self.layers.values())
        for layer in layers:
            if layer.weight.grad is None:
                layer.weight.grad = torch.zeros_like(layer.weight)
        return self._kernel([layer.weight.detach() for layer in layers],
                            [self.pull(name) for name in self.layers],
                            [layer.weight.grad for layer in layers],
                            [layer.cbp_factors for layer in layers],
                            [layer.cbp_scale for layer in layers], self.g, clip)

    @torch.no_grad()
    def step(self, loss: None = None) -> None:
        """One constrained weight update after ``loss.backward()``.

        Adds the penalty gradient (unless ``use_constraint`` is off) and sums the penalty into
        this epoch's share of ``L_sum``, clips gradient values, steps the weight optimizer and
        clamps the quantized weights. A step with no gradient on any quantized weight (no
        ``backward`` since ``zero_grad``) warns: it pulls the weights by the penalty alone (what
        a test of the schedule may want, and a forgotten ``backward`` never does). ``loss`` is
        only there to refuse the previous API's ``step(loss)``, naming the new calls.
        """
        if loss is not None:
            raise TypeError("Lagrangian.step() takes no loss any more: call step() after "
                            "loss.backward(), sum the loss yourself and pass the sum to "
                            "end_epoch(loss_sum)")
        self.follow_the_model()
        if all(layer.weight.grad is None for layer in self.layers.values()):
            warnings.warn("Lagrangian.step(): no quantized weight has a gradient, so this step "
                          "moves them by the penalty alone; call loss.backward() before step()",
                          stacklevel=3)   # past torch.no_grad's wrapper: the caller
        cfg = self.config
        clipped: set[int] = set()
        if cfg.use_constraint:   # clips the quantized weights' gradients in the same pass
            self._penalty_sum += self.add_penalty_grad(cfg.grad_clip_value)
            clipped = {id(layer.weight) for layer in self.layers.values()}
        if cfg.grad_clip_value is not None:
            _clamp_([p.grad for p in self.parameters if p.grad is not None and id(p) not in clipped],
                    cfg.grad_clip_value)
        if self.optimizer is not None:
            self.optimizer.step()
        if cfg.weight_clamp is not None:
            _clamp_([layer.weight for layer in self.layers.values()], cfg.weight_clamp)

    @property
    def device(self) -> torch.device:
        """Where CBP's state is: the quantized weights' device as of the last step or epoch end."""
        return self._penalty_sum.device

    def _weights_device(self) -> torch.device:
        """The device the quantized weights are on now (a model may be moved at any time)."""
        return next(iter(self.layers.values())).weight.device

    @torch.no_grad()
    def follow_the_model(self) -> None:
        """Move CBP's state to the device the quantized weights are on now.

        A framework may move the model after its optimizer was built (the Hugging Face Trainer
        moves it to the GPU in its constructor), as torch's optimizers allow: their state is made
        or moved next to the parameters. The multipliers move in place (the ascent rule holds
        them), and so do the ascent rule's moments; its step counts stay where torch keeps them.
        """
        device = self._weights_device()
        if device == self._penalty_sum.device:
            return
        for lam in self.multipliers.values():
            torch.utils.swap_tensors(lam, lam.to(device))   # the same tensor, now on ``device``
        if self._ascent is not None:
            for state in self._ascent.state.values():
                for key, value in state.items():
                    if key != "step" and torch.is_tensor(value):
                        state[key] = value.to(device)
        self._penalty_sum = self._penalty_sum.to(device)

    # ---- per epoch ------------------------------------------------------------------------------

    @torch.no_grad()
    def update_multipliers(self) -> None:
        """One ascent step on lambda with gradient ``cs(w; g)`` at the current ``g``."""
        for name, layer in self.layers.items():
            lam = self.multipliers[name]
            lam.grad = constraint(layer.weight.detach(), layer.levels, self.g).float()
        self._ascent.step()
        for lam in self.multipliers.values():
            lam.grad = None

    def end_epoch(self, loss_sum: float | torch.Tensor | None = None) -> EpochEnd:
        """The paper's end-of-epoch rule; call once after every epoch (on every process).

        ``loss_sum``: this process's sum of the training loss over the epoch's steps. ``L_sum`` is
        that plus the penalties :meth:`step` summed, averaged over processes. ``p += 1``; if
        ``L_sum >= L_sum_pre`` or ``p == p_max``: increase g, update lambda with the new g, reset
        ``L_sum_pre`` and ``p`` (and drop the weight lr once g reaches ``lr_drop_at_g``); else
        ``L_sum_pre = L_sum``. STE-only (``use_constraint`` off) runs the same clock on its loss
        sum, so ``lr_drop_at_g`` and ``stop_once_g_exceeds`` give it CBP's lr schedule and stopping point
        (identical for ``p_max = 1``); only the multipliers stay unused.
        """
        if loss_sum is None:   # the previous API's end_epoch()
            raise TypeError("Lagrangian.end_epoch(loss_sum) needs the epoch's summed training "
                            "loss: add loss.detach() up after each step() and pass the sum")
        cfg = self.config
        self.follow_the_model()
        total = self._penalty_sum + torch.as_tensor(loss_sum, dtype=torch.float64,
                                                    device=self._penalty_sum.device)
        lagrangian_sum = float(all_reduce_mean(total))
        self._penalty_sum.zero_()
        self.p += 1
        updated = lr_dropped = False
        if lagrangian_sum >= self.lagrangian_sum_pre or self.p >= cfg.p_max:
            self.g += cfg.g_increment(self.g)
            if cfg.use_constraint:  # STE-only keeps the clock (lr drop, finished), not the pull
                self.update_multipliers()
            self.lagrangian_sum_pre = math.inf
            self.p = 0
            updated = True
            if (cfg.lr_drop_at_g is not None and not self.lr_dropped
                    and self.g >= cfg.lr_drop_at_g):
                self._drop_lr()
                self.lr_dropped = lr_dropped = True
        else:
            self.lagrangian_sum_pre = lagrangian_sum
        return EpochEnd(lagrangian_sum, updated, self.g, lr_dropped)

    def _drop_lr(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.config.lr_drop_factor

    def epoch_stats(self) -> dict:
        """A subclass's own figures of the epoch, columns of ``log.jsonl`` (cbp.training.peers);
        CBP has none."""
        return {}

    @property
    def finished(self) -> bool:
        """True once g exceeds ``config.stop_once_g_exceeds`` (never when it is None)."""
        stop = self.config.stop_once_g_exceeds
        return stop is not None and self.g > stop

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "multipliers": {k: v.clone() for k, v in self.multipliers.items()},
            "ascent": self._ascent.state_dict() if self._ascent is not None else None,
            "g": self.g, "p": self.p, "lagrangian_sum_pre": self.lagrangian_sum_pre,
            "lr_dropped": self.lr_dropped, "penalty_sum": self._penalty_sum.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in ("multipliers", "g", "p", "lagrangian_sum_pre", "lr_dropped")
                   if key not in state]
        if "penalty_sum" not in state and "epoch_sum" not in state:
            missing.append("penalty_sum")
        if missing:
            raise ValueError(f"not a Lagrangian.state_dict(): {', '.join(missing)} missing")
        if set(state["multipliers"]) != set(self.multipliers):
            raise ValueError("CBP state does not match the model's quantized layers")
        for name, lam in self.multipliers.items():
            if state["multipliers"][name].shape != lam.shape:
                raise ValueError(f"CBP state for layer {name!r} has the wrong shape")
            lam.copy_(state["multipliers"][name])
        if self._ascent is not None and state.get("ascent") is not None:  # None: plain rule before v2
            self._ascent.load_state_dict(state["ascent"])
        self.g, self.p = float(state["g"]), int(state["p"])
        self.lagrangian_sum_pre = float(state["lagrangian_sum_pre"])
        self.lr_dropped = bool(state["lr_dropped"])
        self._penalty_sum.copy_(_penalty_sum(state))


def _clamp_(tensors: list[torch.Tensor], bound: float) -> None:
    """Clamp each tensor to ``[-bound, bound]`` in place, in one pass.

    ``torch._foreach_clamp_min_`` then ``_foreach_clamp_max_`` give the same values in two passes,
    not vectorised on CPU: 7.4 ms against 1.8 ms over ResNet-18's gradients, one thread.
    """
    for tensor in tensors:
        tensor.clamp_(-bound, bound)


def _penalty_sum(state: dict) -> torch.Tensor:
    """The epoch's penalty sum so far; a state written before it was kept apart from the loss
    (``epoch_sum``: loss and penalty together) is accepted at an epoch's end, where both are 0."""
    if "penalty_sum" in state:
        return state["penalty_sum"]
    if float(state["epoch_sum"]) != 0:
        raise ValueError("this CBP state was saved in the middle of an epoch by an older cbp; "
                         "its penalty sum cannot be told apart from its loss sum")
    return state["epoch_sum"]
