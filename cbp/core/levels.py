"""Level sets: the values a quantized weight may take, as factors of a scale.

A layer's levels are ``factors * a`` with ``a = mean(|W|)`` of its pretrained weights (paper §4),
or, with per-channel scales, ``factors * a_c`` with ``a_c = mean(|W_c|)`` over each output
channel ``c`` (``SCALES``). The four published sets have short names; any sorted, finite set of
at least two distinct factors is accepted too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCALES = ("per-layer", "per-channel")

LEVEL_SETS: dict[str, tuple[float, ...]] = {
    "binary": (-1.0, 1.0),
    "ternary": (-1.0, 0.0, 1.0),
    "shift1": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "shift2": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
}


def resolve_factors(levels: str | Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    """Return the level factors for an alias or a custom set, or raise ``ValueError`` saying why."""
    if isinstance(levels, str):
        if levels not in LEVEL_SETS:
            names = ", ".join(LEVEL_SETS)
            raise ValueError(f"unknown level set {levels!r}; choose one of {names} or give factors")
        return LEVEL_SETS[levels]
    if isinstance(levels, torch.Tensor):
        levels = levels.detach().flatten().tolist()
    try:
        factors = tuple(float(f) for f in levels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"level factors must be numbers, got {levels!r}") from err
    if len(factors) < 2:
        raise ValueError(f"a level set needs at least two levels, got {len(factors)}")
    if not all(math.isfinite(f) for f in factors):
        raise ValueError(f"level factors must be finite, got {factors}")
    if any(b <= a for a, b in zip(factors, factors[1:])):
        raise ValueError(f"level factors must be strictly increasing (sorted, no duplicates), "
                         f"got {factors}")
    check_distinct_in(torch.tensor(factors, dtype=torch.float64), torch.float32,
                      f"level factors {factors}")
    return factors


def check_distinct_in(levels: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse levels that ``dtype`` cannot keep apart: overflowing to inf, or rounding to equal
    (``-1e-50, 1e-50`` are both 0 in float32), or so far apart that their midpoint or spacing
    overflows. Weights of such a set would all land on one level, or become NaN."""
    cast = levels.to(dtype)
    spacing = cast[1:].double() - cast[:-1].double()
    midpoints = (cast[1:] + cast[:-1]) / 2
    finite_spacing = torch.finfo(dtype).max
    if (not bool(cast.isfinite().all()) or not bool((cast[1:] > cast[:-1]).all())
            or not bool(midpoints.isfinite().all()) or not bool((spacing <= finite_spacing).all())):
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"{what} collapse or overflow in {name} (become {cast.tolist()}): "
                         "choose levels of a moderate size")
