"""The penalty gradient of one step, ``lambda * d cs / d w`` per quantized layer: eager or compiled.

:func:`penalty_grad_` is the whole computation for one layer, the gradient clip included, and
:func:`penalty_grads_` runs it for every layer of a step. Run eagerly it makes some twenty passes
over each weight tensor; ``torch.compile`` fuses them into one per layer that reads ``w``,
``lambda`` and the gradient once, all from one call per step, which is what keeps a CBP step
within ~1-2% of an STE step (``benchmarks/step_time.py``). Both run the same function, so they
give the same numbers (``tests/test_penalty.py``).

Compiling takes seconds, so it must pay for itself. Two compiled forms: the *one-graph* form
compiles the whole step's loop (one call per step, the least host time, but a graph that grows
with the layers: 36 s for 16 layers, 73 s for 24 on a 2-core CPU), the *per-layer* form compiles
:func:`penalty_grad_` once for every weight rank (13-15 s measured on a busy CPU core, the
import included) and calls it layer by layer (about
0.1 ms of host time per layer and step). ``CBPConfig.compile_penalty`` decides: True compiles the
one-graph form at the first step, False never; None ("auto") times ``PROBE_STEPS`` eager steps,
then takes the form with the least estimated time over the steps still to come
(:meth:`PenaltyKernel.plan`, which ``cbp.training.train.fit`` calls; a loop of your own that announced
nothing is assumed to run as many steps again as it has, and is reconsidered whenever that
doubles): eager costs its measured pass every step, a compiled form its compile time plus
1/``SPEEDUP`` of it (and the per-layer calls). :attr:`PenaltyKernel.decision` says which and why;
``fit`` prints it (``cbp: penalty pass: ...``). If compiling fails (no C++ compiler, no Triton)
the eager form is used from then on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config

from .constraint import constraint_and_grad, scaled_levels

# The automatic policy's cost model, measured on a 2-core CPU (ResNet-20, the demo GPT and a
# 20M-parameter GPT; README, "Benchmarks"). A faster machine compiles faster too.
PROBE_STEPS = 4                    # eager steps timed (after the first) before deciding
SPEEDUP = 15                       # eager pass / compiled pass: 15x, 19x and 18x measured
PER_LAYER_COMPILE_SECONDS = 8.0    # compiling penalty_grad_ (one graph per weight rank): an
                                   # estimate for a quiet core from 13-15 s on a busy one
ONE_GRAPH_SECONDS_PER_LAYER = 3.0  # compiling penalty_grads_ unrolled over the layers
LAYER_CALL_SECONDS = 1e-4          # host time of one per-layer call of the compiled pass


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
                   g: float | torch.Tensor, clip: float | None = None,
                   layer_fn: Callable = penalty_grad_) -> torch.Tensor:
    """``layer_fn`` (:func:`penalty_grad_`, or it compiled) for every layer of a step; returns the
    float64 sum of their penalties, added layer after layer.

    One call per step, not one per layer: compiled, this is one graph, so what a call to a
    compiled function costs on the host (checking its guards, launching) is paid once a step
    rather than once a layer - most of the pass's time on a model of small layers.
    """
    total = torch.zeros((), dtype=torch.float64, device=ws[0].device)
    for w, lam, grad, f, scale in zip(ws, lams, grads, factors, scales):
        total = total + layer_fn(w, lam, grad, f, scale, g, clip)
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


def _compile_settings() -> contextlib.ExitStack:
    """The settings our graphs are compiled (and their guards checked) under, for this call only:
    the user's own ``torch.compile`` calls keep theirs.

    * No duck sizing: an ``(out, k)`` weight with ``out == k`` would otherwise get a graph of its
      own, compiled again at the first ``out != k`` (a square layer first, as in attention).
    * The CPU's vector instructions taken from what it reports, without Inductor's test build of
      a probe program for each (``cpp.vec_isa_ok``): half the first compile on a 2-core CPU
      (about 20 s to 10 s, one core of a busy machine), the same kernel. Should the compiler
      then fail, compiling fails and the eager pass is used (:meth:`PenaltyKernel.__call__`).
    """
    import torch._inductor.config as inductor_config

    stack = contextlib.ExitStack()
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    stack.enter_context(inductor_config.patch({"cpp.vec_isa_ok": True}))
    return stack


class PenaltyKernel:
    """:func:`penalty_grads_` (every layer of a step), compiled when the policy says so."""

    def __init__(self, compile_policy: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.policy = compile_policy
        self.clock = clock
        self.planned_steps: int | None = None
        self.steps = 0
        self.failed = False
        self.compiled: Callable | None = None
        self.compile_seconds: float | None = None   # the first compiled call's time
        self.decision: str | None = None
        self._g: tuple[float, torch.Tensor] | None = None
        self._layers = 0
        self._eager_seconds = 0.0   # eager passes timed, steps 2 on
        self._planned_at = 0        # the step count when the loop announced its length
        self._decide_at = PROBE_STEPS + 2

    def plan(self, steps: int) -> None:
        """The training loop will make ``steps`` more steps (decides the automatic policy)."""
        self.planned_steps, self._planned_at = steps, self.steps

    def _estimate(self) -> tuple[str, str]:
        """The form with the least estimated time over the remaining steps, and why."""
        timed = self.steps - 2      # passes timed: steps 2 .. steps-1
        eager = self._eager_seconds / timed
        if self.planned_steps is not None:
            remaining = self.planned_steps - (self.steps - 1 - self._planned_at)
        else:
            remaining = self.steps - 1
        layers = self._layers
        costs = {"eager": remaining * eager,
                 "per-layer": PER_LAYER_COMPILE_SECONDS
                 + remaining * (eager / SPEEDUP + layers * LAYER_CALL_SECONDS),
                 "one-graph": ONE_GRAPH_SECONDS_PER_LAYER * layers + remaining * eager / SPEEDUP}
        form = min(costs, key=costs.get)
        why = (f"eager pass {1e3 * eager:.1f} ms/step measured; estimated over {remaining} "
               f"steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in costs.items()))
        return form, why

    def _compile(self, form: str, device: torch.device) -> None:
        if device.type != "cuda":
            _import_inductor_quietly()
        if form == "one-graph":
            self.compiled = torch.compile(penalty_grads_, dynamic=True)
        else:
            layer_fn = torch.compile(penalty_grad_, dynamic=True)
            self.compiled = functools.partial(penalty_grads_, layer_fn=layer_fn)

    def start_step(self, device: torch.device) -> None:
        """Count a step; compile now if this is the step the policy compiles at."""
        self.steps += 1
        if self.policy is not None and self.decision is None:
            if self.policy:
                self._compile("one-graph", device)
            self.decision = ("one-graph compiled (compile_penalty=True)" if self.policy
                             else "eager (compile_penalty=False)")
        elif self.policy is None and self.compiled is None and self.steps == self._decide_at:
            form, why = self._estimate()
            if form != "eager":
                self._compile(form, device)
            elif self.planned_steps is None:   # a loop of unknown length: look again later
                self._decide_at = 2 * self.steps
            self.decision = f"{form}{' compiled' if form != 'eager' else ''} ({why})"

    def _g_tensor(self, g: float, device: torch.device) -> torch.Tensor:
        """``g`` as a tensor, rebuilt only when g changes: a host-to-device copy every step syncs."""
        if self._g is None or self._g[0] != g or self._g[1].device != device:
            self._g = (g, torch.tensor(g, dtype=torch.float32, device=device))
        return self._g[1]

    def __call__(self, ws: list[torch.Tensor], lams: list[torch.Tensor],
                 grads: list[torch.Tensor], factors: list[torch.Tensor],
                 scales: list[torch.Tensor], g: float, clip: float | None = None) -> torch.Tensor:
        if self.compiled is not None:
            tic = self.clock()
            try:
                with _compile_settings():
                    total = self.compiled(ws, lams, grads, factors, scales,
                                          self._g_tensor(g, ws[0].device), clip)
            except Exception:  # compiling failed (it happens at the first call): eager, for good
                self.compiled, self._decide_at = None, -1
                self.failed, self.decision = True, "eager (compiling failed)"
            else:
                if self.compile_seconds is None:   # the first call compiles
                    self.compile_seconds = self.clock() - tic
                    self.decision = (self.decision or "").replace(
                        " compiled", f" compiled in {self.compile_seconds:.1f} s", 1) or None
                return total
        tic = self.clock()
        total = penalty_grads_(ws, lams, grads, factors, scales, g, clip)
        if self.steps >= 2:   # the first pass also warms up: not timed
            self._eager_seconds += self.clock() - tic
        self._layers = len(ws)
        return total
