"""One configuration object for preparing a model and running CBP on it.

Defaults are the published method (paper + reference code, see SPEC.md); every choice is a field,
and every field's ``help`` is its documentation: ``cbp quantize`` makes one flag of each
(``--multiplier-lr``, ``--stop-once-g-exceeds`` ...) with that help and that default, and a TOML
config sets the same names (``cbp.options``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field

import torch.nn as nn

from .ascent import ASCENT_RULES
from .levels import resolve_factors


def _doc(default, help: str, **cli):
    """A field with its documentation. ``cli``: ``flag=False`` (no command-line flag: the CLI
    spells it otherwise), ``aliases`` (older flag spellings that still work; for a switch, flags
    that set the opposite of the default), ``choices``."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class CBPConfig:
    levels: str | Sequence[float] = _doc(
        "binary", "which values the weights may take: binary | ternary | shift1 | shift2, or a "
        "sorted sequence of factors of the layer's scale", flag=False)  # CLI: --constraint, --levels

    # Layer selection (Conv1d/2d/3d and Linear only). A layer is quantized when it passes
    # `filter_fn(module, name)` (if given), matches one of `include` (if any), matches none of
    # `exclude`, and is not the first or last such layer while `skip_first_last` is on.
    filter_fn: Callable[[nn.Module, str], bool] | None = _doc(
        None, "quantize only the layers for which filter_fn(module, name) is true", flag=False)
    include: Sequence[str] = _doc((), "regexes of layer names to quantize (default: all)")
    exclude: Sequence[str] = _doc((), "regexes of layer names to skip")
    skip_first_last: bool = _doc(
        True, "keep the first and the last Conv/Linear layer at full precision (the paper)",
        aliases=("--quantize-first-last",))

    # The constraint term.
    use_constraint: bool = _doc(
        True, "the constraint term; off: plain STE fine-tuning with the same step (the paper's "
        "backpropagation + STE baseline)", aliases=("--no-constraint",))
    multiplier_lr: float = _doc(1e-4, "eta_lambda, the step size of the multipliers' ascent")
    multiplier_rule: str = _doc(
        "adam", "ascent rule of the multipliers (cbp.ascent): adam (reference code) or plain "
        "(lambda += eta_lambda * cs, paper Algorithm 1)", choices=ASCENT_RULES)
    initial_multiplier_update: bool = _doc(
        True, "one lambda update right after initialisation, at g = g_init (reference code)",
        aliases=("--no-initial-update",))

    # The schedule of the window variable g, applied at epoch ends.
    p_max: int = _doc(20, "epochs after which g increases even if L_sum kept falling")
    g_init: float = _doc(1.0, "first g; inf: no window from the start (paper Table 2 ablation)")
    g_increments: Sequence[tuple[float, float]] = _doc(
        ((10, 1), (100, 10), (math.inf, 100)),
        "(bound, increment) pairs: g += increment for the first bound g lies below; on the "
        "command line BOUND:INCREMENT,... e.g. 10:1,100:10,inf:100 (the paper)")
    stop_once_g_exceeds: float | None = _doc(
        None, "end the run at the first epoch end where g > this value (None: never, as in the "
        "paper); with the paper's increments, 200 ends at g = 300", aliases=("--g-final",))

    lr_drop_at_g: float | None = _doc(
        20, "multiply the weight learning rate by lr_drop_factor once, when g reaches this "
        "(None: never)")
    lr_drop_factor: float = _doc(0.1, "see lr_drop_at_g")

    # Reference-code extras, not in the paper.
    grad_clip_value: float | None = _doc(
        1.0, "clip every parameter's gradient to [-v, v] (reference code; none: off)",
        aliases=("--grad-clip",))
    weight_clamp: float | None = _doc(
        1.0, "clamp quantized weights to [-c, c] after each step (reference code; none: off)")

    compile_penalty: bool | None = _doc(
        None, "torch.compile the penalty kernel (cbp.penalty): unset = at the start of a run of "
        "at least 200 steps (Lagrangian.plan), else never; on = always; off = never (eager: the "
        "same numbers, slower)")

    factors: tuple[float, ...] = field(init=False, repr=False)
    g_final: InitVar[float | None] = None  # the old name of stop_once_g_exceeds: a clear error

    def __post_init__(self, g_final: float | None) -> None:
        if g_final is not None:
            raise TypeError("CBPConfig: g_final is now called stop_once_g_exceeds (the run ends "
                            "once g exceeds it)")
        self.factors = resolve_factors(self.levels)
        if self.multiplier_rule not in ASCENT_RULES:
            raise ValueError(f"multiplier_rule must be one of {', '.join(ASCENT_RULES)}, "
                             f"got {self.multiplier_rule!r}")
        if not self.g_init >= 1:
            raise ValueError(f"g_init must be >= 1, got {self.g_init}")
        if self.p_max < 1:
            raise ValueError(f"p_max must be >= 1, got {self.p_max}")
        if self.compile_penalty not in (None, True, False):
            raise ValueError(f"compile_penalty must be None (auto), True or False, got "
                             f"{self.compile_penalty!r}")
        if self.multiplier_lr < 0 or not math.isfinite(self.multiplier_lr):
            raise ValueError(f"multiplier_lr must be a finite number >= 0, got {self.multiplier_lr}")

    def g_increment(self, g: float) -> float:
        """Delta g at the current g (paper: 1 below 10, 10 below 100, 100 above)."""
        for bound, increment in self.g_increments:
            if g < bound:
                return increment
        return 0.0
