"""The penalty gradient of one step, ``lambda * d cs / d w`` per quantized layer: eager or compiled.

:func:`penalty_grad_` is the whole computation for one layer, the gradient clip included, and
:func:`penalty_grads_` runs it for every layer of a step. Run eagerly it makes some twenty passes
over each weight tensor; ``torch.compile`` fuses them into one per layer that reads ``w``,
``lambda`` and the gradient once, all from one call per step, which is what keeps a CBP step
within ~1-2% of an STE step (``benchmarks/step_time.py``). Both run the same function, so they
give the same numbers (``tests/test_fast_path.py``).

Compiling takes seconds (one graph for all layers: 18 to 42 s on a 2-core CPU), worth it only
for a long run. ``CBPConfig.compile_penalty``
decides: True compiles at the first step, False never; None ("auto") compiles at the first step
when the training loop announced at least ``AUTO_COMPILE_STEPS`` steps (:meth:`PenaltyKernel.plan`,
which ``cbp.train.fit`` calls), never when it announced fewer, and - in a loop of your own that
announced nothing - once ``AUTO_COMPILE_STEPS`` steps have passed. If compiling fails (no C++
compiler, no Triton) the eager form is used from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .constraint import constraint_and_grad, scaled_levels

AUTO_COMPILE_STEPS = 200


def penalty_grad_(w: torch.Tensor, lam: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor,
                  scale: torch.Tensor, g: float | torch.Tensor,
                  clip: float | None = None) -> torch.Tensor:
    """``grad += lam * d cs / d w`` for one layer, then ``grad`` clipped to ``[-clip, clip]`` if
    ``clip`` is given; returns ``sum(lam * cs)``.

    Takes the layer's factors and scale rather than its levels so that, compiled, computing the
    levels is part of the one fused pass - and so is the clip, which would otherwise read and
    write the gradient again.
    """
    levels = scaled_levels(factors, scale).to(w.dtype)  # as QuantizedLayer.levels
    cs, slope = constraint_and_grad(w, levels, g)
    grad.addcmul_(lam, slope)
    if clip is not None:
        grad.clamp_(-clip, clip)
    return (lam * cs).sum()


def penalty_grads_(ws: list[torch.Tensor], lams: list[torch.Tensor], grads: list[torch.Tensor],
                   factors: list[torch.Tensor], scales: list[torch.Tensor],
                   g: float | torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """:func:`penalty_grad_` for every layer of a step; returns the float64 sum of their penalties,
    added layer after layer.

    One call per step, not one per layer: compiled, this is one graph, so what a call to a
    compiled function costs on the host (checking its guards, launching) is paid once a step
    rather than once a layer - most of the pass's time on a model of small layers.
    """
    total = torch.zeros((), dtype=torch.float64, device=ws[0].device)
    for w, lam, grad, f, scale in zip(ws, lams, grads, factors, scales):
        total = total + penalty_grad_(w, lam, grad, f, scale, g, clip)
    return total


def _import_inductor_quietly() -> None:
    """Import what ``torch.compile`` needs without its "No CUDA runtime is found" notice.

    ``torch.utils.cpp_extension`` logs it when first imported on a machine without a GPU, which
    says nothing about a CPU run.
    """
    log = logging.getLogger("torch.utils.cpp_extension")
    notice = logging.Filter()
    notice.filter = lambda record: "No CUDA runtime" not in record.getMessage()
    log.addFilter(notice)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.removeFilter(notice)


class PenaltyKernel:
    """:func:`penalty_grads_` (every layer of a step), compiled when the policy says so."""

    def __init__(self, compile_policy: bool | None = None) -> None:
        self.policy = compile_policy
        self.planned_steps: int | None = None
        self.steps = 0
        self.failed = False
        self.compiled: Callable | None = None
        self._g: tuple[float, torch.Tensor] | None = None

    def plan(self, steps: int) -> None:
        """The training loop will make ``steps`` more steps (decides the automatic policy)."""
        self.planned_steps = steps

    def _wants_compiled(self) -> bool:
        if self.failed or self.policy is False:
            return False
        if self.policy is True:
            return True
        if self.planned_steps is not None:
            return self.planned_steps >= AUTO_COMPILE_STEPS
        return self.steps > AUTO_COMPILE_STEPS

    def start_step(self, device: torch.device) -> None:
        """Count a step; compile now if this is the step the policy compiles at."""
        self.steps += 1
        if self.compiled is None and self._wants_compiled():
            if device.type != "cuda":
                _import_inductor_quietly()
            self.compiled = torch.compile(penalty_grads_, dynamic=True)

    def _g_tensor(self, g: float, device: torch.device) -> torch.Tensor:
        """``g`` as a tensor, rebuilt only when g changes: a host-to-device copy every step syncs."""
        if self._g is None or self._g[0] != g or self._g[1].device != device:
            self._g = (g, torch.tensor(g, dtype=torch.float32, device=device))
        return self._g[1]

    def __call__(self, ws: list[torch.Tensor], lams: list[torch.Tensor],
                 grads: list[torch.Tensor], factors: list[torch.Tensor],
                 scales: list[torch.Tensor], g: float, clip: float | None = None) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(ws, lams, grads, factors, scales,
                                     self._g_tensor(g, ws[0].device), clip)
            except Exception:  # compiling failed (it happens at the first call): eager, for good
                self.compiled, self.failed = None, True
        return penalty_grads_(ws, lams, grads, factors, scales, g, clip)
