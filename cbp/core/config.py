"""One configuration object for preparing a model and running CBP on it.

Defaults are the published method (Kim & Jeong, NeurIPS 2021, arXiv:2110.02550, and its reference
code, github.com/dooseokjeong/CBP); every choice is a field,
and every field's ``help`` is its documentation: ``cbp quantize`` makes one flag of each
(``--multiplier-lr``, ``--stop-once-g-exceeds`` ...) with that help and that default, and a TOML
config sets the same names (``cbp.cli.options``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field

import torch.nn as nn

from .ascent import ASCENT_RULES
from .levels import SCALES, resolve_factors


class SettingError(ValueError):
    """A setting out of its range; ``name`` says which, ``requirement`` the rest of the message."""

    def __init__(self, name: str, requirement: str) -> None:
        super().__init__(f"{name} {requirement}")
        self.name, self.requirement = name, requirement


def _check_patterns(name: str, patterns) -> None:
    """``include`` / ``exclude``: a list of regular expressions (one string would be read as a
    list of one-character patterns)."""
    if isinstance(patterns, str):
        raise SettingError(name, f"must be a list of regular expressions, not one string: "
                                 f"[{patterns!r}]")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise SettingError(name, f"holds {pattern!r}, which is not a regular expression: "
                                     f"{err}") from None


def check_number(name: str, value, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None, below: float | None = None,
                 none_ok: bool = False, integer: bool = False) -> None:
    """Raise ``SettingError("<name> must be ..., got <value>")`` unless ``value`` is in range.

    The one place every numeric setting is checked (``CBPConfig`` and the CLI's training
    settings), so that a NaN, a sign or a zero that would silently break training never gets in.
    Infinity passes only where an upper bound allows it.
    """
    if value is None and none_ok:
        return
    finite = below == math.inf
    bounds = [f"> {above:g}" if above is not None else "",
              f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else "",
              f"< {below:g}" if below is not None and not finite else ""]
    wanted = ("a finite " if finite else "an " if integer else "a ") + (
        "integer" if integer else "number")
    wanted += " " + " and ".join(b for b in bounds if b) if any(bounds) else ""
    wanted += ", or None" if none_ok else ""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        is_number = isinstance(value, int) and not isinstance(value, bool)
    ok = is_number and not math.isnan(value)
    if ok:
        ok = ((above is None or value > above) and (at_least is None or value >= at_least)
              and (at_most is None or value <= at_most) and (below is None or value < below)
              and (math.isfinite(value) or (at_most is None and below is None and value > 0)))
    if not ok:
        raise SettingError(name, f"must be {wanted}, got {value!r}")


def _doc(default, help: str, **cli):  # pragma: no mutate block (runs at import, before a mutant is on)
    """A field with its documentation. ``cli``: ``flag=False`` (no command-line flag: the CLI
    spells it otherwise), ``aliases`` (older flag spellings that still work; for a switch, flags
    that set the opposite of the default), ``choices``."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class CBPConfig:
    levels: str | Sequence[float] = _doc(
        "binary", "which values the weights may take: binary | ternary | shift1 | shift2, or a "
        "sorted sequence of factors of the layer's scale", flag=False)  # CLI: --levels

    scale: str = _doc(
        "per-layer", "the scale a the levels are factors of: per-layer (one a = mean|W| per "
        "layer, the paper's) or per-channel (one a_c = mean|W_c| per output channel: finer for "
        "layers whose channels differ in size, depthwise convolutions above all)", choices=SCALES)

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
        "adam", "ascent rule of the multipliers (cbp.core.ascent): adam (reference code) or plain "
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
        None, "torch.compile the penalty kernel (cbp.core.penalty): unset = after 5 eager steps, in the "
        "form (eager, per-layer or one-graph compiled) with the least estimated time over the "
        "run's remaining steps (Lagrangian.plan); on = one graph from the first step; off = never "
        "(eager: the same numbers, slower)")

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
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.compile_penalty not in (None, True, False):
            raise ValueError(f"compile_penalty must be None (auto), True or False, got "
                             f"{self.compile_penalty!r}")
        for name in ("include", "exclude"):
            _check_patterns(name, getattr(self, name))
        self.validate()

    def validate(self) -> None:
        """Every numeric field in its range, or ``ValueError`` naming the field (one line).

        Infinity is accepted where it means "never" (``g_init``: no window,
        ``stop_once_g_exceeds``,
        ``lr_drop_at_g``, ``grad_clip_value``, ``weight_clamp``); NaN nowhere.
        """
        check_number("multiplier_lr", self.multiplier_lr, at_least=0, below=math.inf)
        check_number("p_max", self.p_max, at_least=1, integer=True)
        check_number("g_init", self.g_init, at_least=1)
        check_number("stop_once_g_exceeds", self.stop_once_g_exceeds, at_least=self.g_init,
                     none_ok=True)
        check_number("lr_drop_at_g", self.lr_drop_at_g, above=0, none_ok=True)
        check_number("lr_drop_factor", self.lr_drop_factor, above=0, at_most=1)
        check_number("grad_clip_value", self.grad_clip_value, above=0, none_ok=True)
        check_number("weight_clamp", self.weight_clamp, above=0, none_ok=True)
        bounds = []
        for pair in self.g_increments:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"g_increments must hold (bound, increment) pairs, got {pair!r}")
            check_number("a g_increments bound", pair[0], above=bounds[-1] if bounds else 0)
            check_number("a g_increments increment", pair[1], above=0, below=math.inf)
            bounds.append(pair[0])
        if not bounds or bounds[-1] != math.inf:
            raise ValueError("g_increments must end with an infinite bound (else g would stop "
                             f"growing and the schedule never end), got {self.g_increments!r}")

    def g_increment(self, g: float) -> float:
        """Delta g at the current g (paper: 1 below 10, 10 below 100, 100 above)."""
        for bound, increment in self.g_increments:
            if g < bound:
                return increment
        return 0.0
