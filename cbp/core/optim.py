"""CBP as an optimizer: any torch optimizer wrapped so that its ``step()`` is the constrained step.

Training frameworks (Lightning, the Hugging Face Trainer, ...) own the loop: they call
``optimizer.step()``, ``zero_grad()`` and ``state_dict()`` and know nothing else. Wrapping the
optimizer puts all of CBP behind those three calls, in the spirit of torchao's PARQ
``QuantOptimizer``: :class:`CBPOptimizer` holds a :class:`~cbp.core.lagrangian.Lagrangian` (the
multipliers, g, p, the constrained step - not a copy of it) and the loss summed so far this epoch;
its ``state_dict()`` is the base optimizer's plus all of that, so the framework's own checkpoint
resumes CBP exactly. Two calls remain for the loop, or for the framework callbacks of
:mod:`cbp.integrations`: :meth:`CBPOptimizer.add_loss` once per training forward and
:meth:`CBPOptimizer.end_epoch` at every epoch end::

    model = cbp.prepare(model, config)
    optimizer = cbp.CBPOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()          # + lambda * dcs/dw, grad clip, AdamW step, weight clamp
            optimizer.add_loss(loss)
        optimizer.end_epoch()         # the paper's rule on L_sum
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .config import CBPConfig
from .lagrangian import EpochEnd, Lagrangian


class CBPOptimizer(torch.optim.Optimizer):
    """``base_optimizer`` with CBP's constrained step; a ``torch.optim.Optimizer`` to frameworks.

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's (an lr scheduler built
    on the wrapper moves the base optimizer's lr), and any other attribute is looked up there too.
    ``lagrangian`` holds CBP's state: ``multipliers``, ``g``, ``p``, ``finished``.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer,
                 config: CBPConfig) -> None:
        # torch.optim.Optimizer.__init__ is not called: it would build param_groups and state of
        # its own, and the wrapper must have exactly the base optimizer's.
        self.base_optimizer = base_optimizer
        self.lagrangian = Lagrangian(model, config, base_optimizer)
        # changed in place only: Lightning's optimizer wrapper holds a copy of this __dict__
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.lagrangian.device)

    def __getattr__(self, name: str):
        if name == "base_optimizer":   # not set yet (while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base_optimizer, name)

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.base_optimizer.defaults

    @property
    def config(self) -> CBPConfig:
        return self.lagrangian.config

    @property
    def finished(self) -> bool:
        """True once g exceeds ``config.stop_once_g_exceeds``: the callbacks stop training then."""
        return self.lagrangian.finished

    def __repr__(self) -> str:
        return f"CBPOptimizer({self.base_optimizer!r})"

    # ---- the three calls a framework makes --------------------------------------------------------

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Run ``closure`` if given (forward and backward: Lightning passes one), then the
        constrained step: penalty gradient, gradient clip, the base optimizer's step (without
        the closure: the gradients are ready), weight clamp. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lagrangian.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``"cbp"``: the whole CBP state and this epoch's
        loss sum so far, so a checkpoint taken in the middle of an epoch resumes exactly."""
        state = self.base_optimizer.state_dict()
        state["cbp"] = {**self.lagrangian.state_dict(), "loss_sum": self._loss_sum.clone()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        cbp_state = state.pop("cbp", None)
        if cbp_state is None:
            raise ValueError("this optimizer state has no CBP state: it was saved by the plain "
                             "optimizer, not by cbp.CBPOptimizer")
        self.lagrangian.load_state_dict(cbp_state)   # first: it refuses another model's layers
        self.base_optimizer.load_state_dict(state)
        self._loss_sum.copy_(cbp_state["loss_sum"])

    # ---- the epoch clock --------------------------------------------------------------------------

    def add_loss(self, loss: torch.Tensor | float) -> None:
        """Add one training forward's loss to this epoch's sum (no device synchronisation once
        the model is where it trains: the sum follows the model as the Lagrangian does)."""
        if self._loss_sum.device != self.lagrangian.device:
            torch.utils.swap_tensors(self._loss_sum, self._loss_sum.to(self.lagrangian.device))
        self._loss_sum += torch.as_tensor(loss).detach().to(self._loss_sum)

    def end_epoch(self) -> EpochEnd:
        """:meth:`Lagrangian.end_epoch` on the losses added since the last call (on every
        process: L_sum is averaged over them); starts the next epoch's sum."""
        end = self.lagrangian.end_epoch(self._loss_sum)
        self._loss_sum.zero_()
        return end

    def plan(self, steps: int) -> None:
        """About ``steps`` steps follow (decides whether the penalty kernel is compiled)."""
        self.lagrangian.plan(steps)
