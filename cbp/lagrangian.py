"""The multipliers and the schedule: everything CBP adds to an ordinary training loop.

One object holds the state of paper Algorithm 1 - a multiplier ``lambda_i >= 0`` per quantized
weight, the window variable ``g``, the epoch counter ``p`` and ``L_sum_pre`` - and
``state_dict()`` / ``load_state_dict()`` round-trip all of it, so resuming is free. A training loop
calls :meth:`Lagrangian.step` in place of ``optimizer.step()`` and :meth:`Lagrangian.end_epoch`
after every epoch::

    model = cbp.prepare(model, config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            lagrangian.step(loss)
        lagrangian.end_epoch()
        if lagrangian.finished:
            break
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import CBPConfig
from .constraint import _fused_penalties, constraint, constraint_and_grad
from .distributed import all_reduce_mean
from .layers import quantized_layers


@dataclass
class EpochEnd:
    """What :meth:`Lagrangian.end_epoch` decided."""

    lagrangian_sum: float     # L_sum of the epoch just ended (averaged over processes)
    updated: bool             # g increased and lambda updated
    g: float                  # g after the decision
    lr_dropped: bool          # the weight learning rate was multiplied by lr_drop_factor now


_COMPILE_ENV = "CBP_COMPILE"
_AUTO_COMPILE_AFTER = 200  # steps; short runs and test suites never pay for compiling


class _PenaltyKernel:
    """How :meth:`Lagrangian.add_penalty_grad` computes a layer: eager, or one compiled pass.

    The eager form makes some twenty passes over every weight tensor; ``torch.compile`` fuses them
    into one that reads ``w``, ``lambda`` and the gradient once, which is what keeps a CBP step
    within ~2% of an STE step (``benchmarks/step_time.py``). Compiling takes seconds, so by default
    it happens once a run has made ``_AUTO_COMPILE_AFTER`` steps; ``CBP_COMPILE=1`` compiles at the
    first step, ``CBP_COMPILE=0`` never. If compiling fails (no C++ compiler, no Triton) the eager
    form is used from then on; both give the same numbers (tests/test_fast_path.py).
    """

    compiled: Callable | None = None   # one per process, shared by every Lagrangian
    failed = False

    def __init__(self) -> None:
        mode = os.environ.get(_COMPILE_ENV, "auto")
        after = {"0": math.inf, "1": 0, "auto": _AUTO_COMPILE_AFTER}.get(mode)
        if after is None:
            raise ValueError(f"{_COMPILE_ENV} must be 0, 1 or auto, got {mode!r}")
        self.compile_after, self.calls = after, 0
        self.g_value: float | None = None
        self.g_tensor: torch.Tensor | None = None

    def fused(self, g: float, device: torch.device) -> tuple[Callable | None, torch.Tensor | None]:
        """The compiled per-layer function for this step (None: go eager) and ``g`` as a tensor.

        The tensor is rebuilt only when g changes: a host-to-device copy every step would sync.
        """
        self.calls += 1
        if self.calls <= self.compile_after or _PenaltyKernel.failed:
            return None, None
        if _PenaltyKernel.compiled is None:
            _PenaltyKernel.compiled = torch.compile(_fused_penalties, dynamic=True)
        if self.g_value != g or self.g_tensor.device != device:
            self.g_value, self.g_tensor = g, torch.tensor(g, dtype=torch.float32, device=device)
        return _PenaltyKernel.compiled, self.g_tensor


class Lagrangian:
    """Multipliers, window schedule and the constrained step for a prepared model."""

    def __init__(self, model: nn.Module, config: CBPConfig,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.config = config
        self.optimizer = optimizer
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError("the model has no quantized layer; call cbp.prepare(model, config) first")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        # STE-only (use_constraint off) holds no multiplier: it costs no memory over plain STE.
        self.multipliers = {name: torch.zeros_like(layer.weight, dtype=torch.float32)
                            for name, layer in self.layers.items()} if config.use_constraint else {}
        self._ascent = None
        if config.multiplier_rule == "adam" and self.multipliers:
            # maximize=True: Adam climbs L in lambda, whose gradient is cs (>= 0).
            self._ascent = torch.optim.Adam(list(self.multipliers.values()),
                                            lr=config.multiplier_lr, maximize=True)
        self.g = float(config.g_init)
        self.p = 0
        self.lagrangian_sum_pre = math.inf
        self.lr_dropped = False
        self.epoch = 0
        device = next(iter(self.layers.values())).weight.device
        self._epoch_sum = torch.zeros((), dtype=torch.float64, device=device)
        if config.use_constraint and config.initial_multiplier_update:
            self.update_multipliers()

    # ---- per step -------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """``sum_i lambda_i cs(w_i; g)`` as a differentiable tensor: the reference form.

        :meth:`step` adds the same gradient in closed form, which is cheaper; use this to add the
        term to your own loss and call ``backward`` on the sum.
        """
        return sum((lam * constraint(layer.weight, layer.levels, self.g)).sum()
                   for layer, lam in zip(self.layers.values(), self.multipliers.values()))

    @torch.no_grad()
    def add_penalty_grad(self, clip: float | None = None) -> torch.Tensor:
        """Add ``lambda * d cs / d w`` to each quantized weight's ``.grad``; return the penalty value.

        Closed-form gradient of :meth:`penalty` (see ``constraint_and_grad``), with no autograd
        graph and no device synchronisation; once compiled (see ``_PenaltyKernel``), one call for
        all layers and one fused pass per layer. With ``clip``, each of these gradients is then
        clipped to ``[-clip, clip]`` - in the same pass - as :meth:`step` clips every gradient.
        """
        kernel = self.__dict__.get("_penalty_kernel")
        if kernel is None:
            kernel = self._penalty_kernel = _PenaltyKernel()
        device = self._epoch_sum.device
        fused, g = kernel.fused(self.g, device)
        layers = list(self.layers.values())
        for layer in layers:
            if layer.weight.grad is None:
                layer.weight.grad = torch.zeros_like(layer.weight)
        if fused is not None:
            try:
                return fused([layer.weight.detach() for layer in layers],
                             list(self.multipliers.values()),
                             [layer.weight.grad for layer in layers],
                             [layer.cbp_factors for layer in layers],
                             [layer.cbp_scale for layer in layers], g, clip)
            except Exception:  # compiling failed: the eager form, for good
                _PenaltyKernel.failed = True
        total = torch.zeros((), dtype=torch.float64, device=device)
        for layer, lam in zip(layers, self.multipliers.values(), strict=True):
            w = layer.weight
            cs, slope = constraint_and_grad(w.detach(), layer.levels, self.g)
            w.grad.addcmul_(lam, slope)
            if clip is not None:
                w.grad.clamp_(-clip, clip)
            total += torch.dot(lam.flatten(), cs.flatten())
        return total

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        """One constrained weight update after ``loss.backward()``.

        Adds the penalty gradient (unless ``use_constraint`` is off), clips gradient values, steps
        the weight optimizer, clamps the quantized weights, and adds ``L = loss + penalty`` to the
        epoch's ``L_sum``.
        """
        cfg = self.config
        lagrangian = loss.detach().to(torch.float64)
        clipped: set[int] = set()
        if cfg.use_constraint:   # clips the quantized weights' gradients in the same pass
            lagrangian = lagrangian + self.add_penalty_grad(cfg.grad_clip_value)
            clipped = {id(layer.weight) for layer in self.layers.values()}
        if cfg.grad_clip_value is not None:
            _clamp_([p.grad for p in self.parameters if p.grad is not None and id(p) not in clipped],
                    cfg.grad_clip_value)
        if self.optimizer is not None:
            self.optimizer.step()
        if cfg.weight_clamp is not None:
            _clamp_([layer.weight for layer in self.layers.values()], cfg.weight_clamp)
        self._epoch_sum += lagrangian

    # ---- per epoch ------------------------------------------------------------------------------

    @torch.no_grad()
    def update_multipliers(self) -> None:
        """One ascent step on lambda with gradient ``cs(w; g)`` at the current ``g``."""
        for name, layer in self.layers.items():
            cs = constraint(layer.weight.detach(), layer.levels, self.g).float()
            lam = self.multipliers[name]
            if self._ascent is None:
                lam.add_(cs, alpha=self.config.multiplier_lr)
            else:
                lam.grad = cs
        if self._ascent is not None:
            self._ascent.step()
            for lam in self.multipliers.values():
                lam.grad = None

    def merge_partial_sum(self) -> None:
        """Give every process the mean over processes of this epoch's ``L_sum`` so far.

        Called before a mid-epoch checkpoint, which rank 0 alone writes: without it, a resumed
        run would carry rank 0's share in place of every process's. The mean of the completed
        sums that :meth:`end_epoch` takes is unchanged. A collective: every process calls it.
        """
        all_reduce_mean(self._epoch_sum)

    def end_epoch(self) -> EpochEnd:
        """The paper's end-of-epoch rule; call once after every epoch (on every process).

        ``p += 1``; if ``L_sum >= L_sum_pre`` or ``p == p_max``: increase g, update lambda with the
        new g, reset ``L_sum_pre`` and ``p`` (and drop the weight lr once g reaches
        ``lr_drop_at_g``); else ``L_sum_pre = L_sum``.
        """
        cfg = self.config
        lagrangian_sum = float(all_reduce_mean(self._epoch_sum.clone()))
        self._epoch_sum.zero_()
        self.epoch += 1
        self.p += 1
        updated = lr_dropped = False
        if cfg.use_constraint and (lagrangian_sum >= self.lagrangian_sum_pre or self.p >= cfg.p_max):
            self.g += cfg.g_increment(self.g)
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

    @property
    def finished(self) -> bool:
        """True once g has passed ``config.g_final`` (never when it is None)."""
        return self.config.g_final is not None and self.g > self.config.g_final

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "multipliers": {k: v.clone() for k, v in self.multipliers.items()},
            "ascent": self._ascent.state_dict() if self._ascent is not None else None,
            "g": self.g, "p": self.p, "lagrangian_sum_pre": self.lagrangian_sum_pre,
            "lr_dropped": self.lr_dropped, "epoch": self.epoch,
            "epoch_sum": self._epoch_sum.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["multipliers"]) != set(self.multipliers):
            raise ValueError("CBP state does not match the model's quantized layers")
        for name, lam in self.multipliers.items():
            if state["multipliers"][name].shape != lam.shape:
                raise ValueError(f"CBP state for layer {name!r} has the wrong shape")
            lam.copy_(state["multipliers"][name])
        if self._ascent is not None and state["ascent"] is not None:
            self._ascent.load_state_dict(state["ascent"])
        self.g, self.p = float(state["g"]), int(state["p"])
        self.lagrangian_sum_pre = float(state["lagrangian_sum_pre"])
        self.lr_dropped, self.epoch = bool(state["lr_dropped"]), int(state["epoch"])
        self._epoch_sum.copy_(state["epoch_sum"])


def _clamp_(tensors: list[torch.Tensor], bound: float) -> None:
    """Clamp each tensor to ``[-bound, bound]`` in place, in one pass.

    ``torch._foreach_clamp_min_`` then ``_foreach_clamp_max_`` give the same values in two passes,
    not vectorised on CPU: 7.4 ms against 1.8 ms over ResNet-18's gradients, one thread.
    """
    for tensor in tensors:
        tensor.clamp_(-bound, bound)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups with weight decay on Conv/Linear weights only, not on BatchNorm or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = pname == "weight" and isinstance(
                module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
