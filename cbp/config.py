"""One configuration object for preparing a model and running CBP on it.

Defaults are the published method (paper + reference code, see SPEC.md); every choice is a field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.nn as nn

from .ascent import ASCENT_RULES
from .levels import resolve_factors


@dataclass
class CBPConfig:
    # Which values the weights may take: "binary" | "ternary" | "shift1" | "shift2" or factors.
    levels: str | Sequence[float] = "binary"

    # Layer selection (Conv1d/2d/3d and Linear only). A layer is quantized when it passes
    # `filter_fn(module, name)` (if given), matches one of `include` (if any), matches none of
    # `exclude`, and is not the first or last such layer while `skip_first_last` is on.
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    skip_first_last: bool = True

    # The constraint term. `use_constraint=False` leaves plain STE training (the paper's
    # "backpropagation + STE" baseline) with the same step.
    use_constraint: bool = True
    multiplier_lr: float = 1e-4          # eta_lambda
    multiplier_rule: str = "adam"        # cbp.ascent: "adam" (reference) | "plain" (lambda += eta * cs)
    initial_multiplier_update: bool = True  # reference: one lambda update right after init (g = g_init)

    # The schedule of the window variable g, applied at epoch ends.
    p_max: int = 20
    g_init: float = 1.0                  # math.inf: no window from the start (paper Table 2 ablation)
    # (upper bound, increment) pairs: g += increment for the first bound g lies below.
    g_increments: Sequence[tuple[float, float]] = ((10, 1), (100, 10), (math.inf, 100))
    g_final: float | None = None         # schedule complete once g exceeds this (None: never)

    # Weight learning-rate drop, once, when g reaches `lr_drop_at_g`.
    lr_drop_at_g: float | None = 20
    lr_drop_factor: float = 0.1

    # Reference-code extras, not in the paper.
    grad_clip_value: float | None = 1.0  # clip every parameter's gradient to [-v, v]
    weight_clamp: float | None = 1.0     # clamp quantized weights to [-c, c] after each step

    # Compile the penalty kernel (cbp.penalty): None = when the run is long enough to pay back the
    # seconds it takes, True = always, False = never (eager; the same numbers).
    compile_penalty: bool | None = None

    factors: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
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
