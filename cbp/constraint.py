"""The sawtooth constraint of paper Eq. 8-10 and its gradient.

All functions take real-valued weights ``w`` and a sorted 1-D tensor ``levels`` (absolute values,
factors times scale) and work elementwise. With ``lo, hi`` the levels around ``w`` and ``m`` their
midpoint:

* ``Y(w) = 2 |w - Q(w)|`` inside ``[q_1, q_n]`` (a tent ``2 min(w - lo, hi - w)``), and the outer
  arms ``2 (q_1 - w)`` below and ``2 (w - q_n)`` above;
* the unconstrained-weight window is ``m - h/(2g) <= w < m + h/(2g)`` with ``h = hi - lo``
  (the paper's ``|w - m + eps| < h/(2g)``, ``eps -> 0+``); the outer arms are never windowed;
* ``cs(w; g) = ucs(w; g) Y(w)`` with ``ucs = 0`` inside the window, 1 outside.
"""

from __future__ import annotations

import torch


def _interval(w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper level of the interval ``[lo, hi)`` holding each weight (outer one if outside)."""
    j = torch.bucketize(w, levels[1:-1], right=True)
    return levels[j], levels[j + 1]


def quantize(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level, clipped to ``[q_1, q_n]``; an exact midpoint goes to the lower level."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(w, midpoints)]


def sawtooth(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``Y(w)`` of paper Eq. 8: twice the distance to the nearest level, linear outside the range.

    Autograd gives the paper's slopes: +-2, and 0 at a midpoint where ``minimum`` splits its tie.
    """
    lo, hi = _interval(w, levels)
    tent = 2 * torch.minimum(w - lo, hi - w)  # exactly 0 on a level: no rounding below zero
    below, above = 2 * (levels[0] - w), 2 * (w - levels[-1])
    return torch.where(w < levels[0], below, torch.where(w > levels[-1], above, tent))


def constrained_mask(w: torch.Tensor, levels: torch.Tensor, g: float) -> torch.Tensor:
    """``ucs(w; g)`` of paper Eq. 10 as a bool tensor: True where the constraint applies."""
    lo, hi = _interval(w, levels)
    offset = w - (lo + hi) / 2
    half_width = (hi - lo) / (2 * g)
    in_window = (offset >= -half_width) & (offset < half_width)
    inside = (w >= levels[0]) & (w <= levels[-1])
    return ~(in_window & inside)


def constraint(w: torch.Tensor, levels: torch.Tensor, g: float) -> torch.Tensor:
    """``cs(w; g) = ucs(w; g) Y(w)`` (paper Eq. 9). Differentiable in ``w`` through ``Y`` only."""
    return sawtooth(w, levels) * constrained_mask(w, levels, g)


def constraint_and_grad(
    w: torch.Tensor, levels: torch.Tensor, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cs(w; g)`` and ``d cs / d w`` in closed form, without autograd.

    The slope is ``-2 sign(w - m)`` on a tent, ``-2`` below the range, ``+2`` above it, and 0 in the
    window: exactly what autograd gives for :func:`constraint`, at a fraction of the cost.
    """
    lo, hi = _interval(w, levels)
    offset = w - (lo + hi) / 2
    half_width = (hi - lo) / 2
    below, above = w < levels[0], w > levels[-1]
    window = (offset >= -half_width / g) & (offset < half_width / g) & ~(below | above)
    slope = torch.where(below, -2.0, torch.where(above, 2.0, -2 * torch.sign(offset)))
    y = torch.where(below, 2 * (levels[0] - w),
                    torch.where(above, 2 * (w - levels[-1]), 2 * torch.minimum(w - lo, hi - w)))
    keep = ~window
    return y * keep, slope * keep
