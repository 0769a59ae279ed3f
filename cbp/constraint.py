"""The sawtooth constraint of paper Eq. 8-10 and its gradient, written once.

All functions take real-valued weights ``w`` and a sorted 1-D tensor ``levels`` (absolute values,
factors times scale) and work elementwise. With ``lo, hi`` the levels around ``w`` and ``m`` their
midpoint:

* ``Y(w) = 2 |w - Q(w)|`` inside ``[q_1, q_n]`` (a tent ``2 min(w - lo, hi - w)``), and the outer
  arms ``2 (q_1 - w)`` below and ``2 (w - q_n)`` above;
* the unconstrained-weight window is ``m - h/(2g) <= w < m + h/(2g)`` with ``h = hi - lo``
  (the paper's ``|w - m + eps| < h/(2g)``, ``eps -> 0+``); the outer arms are never windowed;
* ``cs(w; g) = ucs(w; g) Y(w)`` with ``ucs = 0`` inside the window, 1 outside.

:func:`_equations` is the only place these are written; the public functions, the closed-form
gradient and the fused kernel of :mod:`cbp.penalty` all read them from there, so every path
rounds alike (``g = inf`` is "no window": ``constraint(w, levels, inf) == sawtooth(w, levels)``).
"""

from __future__ import annotations

import math

import torch


def _interval(w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper level of the interval ``[lo, hi)`` holding each weight (outer one if outside).

    One comparison per interior level rather than ``bucketize``: no int64 index tensor, so that
    ``torch.compile`` fuses it with :func:`_equations` into a single pass over the weights.
    """
    lo, hi = levels[0], levels[1]
    for k in range(1, levels.shape[0] - 1):
        up = w >= levels[k]
        lo, hi = torch.where(up, levels[k], lo), torch.where(up, levels[k + 1], hi)
    return lo, hi


def quantize(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level, clipped to ``[q_1, q_n]``; an exact midpoint goes to the lower level.

    One elementwise ``where`` per midpoint rather than ``bucketize``: it returns the level values
    exactly and keeps the weight's memory format (channels-last convolution weights stay so).
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    q = levels[0].expand_as(w)
    for k in range(len(midpoints)):
        q = torch.where(w > midpoints[k], levels[k + 1], q)
    return q


def _equations(
    w: torch.Tensor, levels: torch.Tensor, g: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Y(w)`` (Eq. 8), ``ucs(w; g)`` as a bool tensor (Eq. 10) and the slope ``dY/dw``.

    ``Y`` is differentiable, and autograd gives exactly the slope returned here: ``+-2``, and 0 at
    a midpoint where ``minimum`` splits its tie. ``g`` may be a tensor (a new g then does not
    recompile the fused kernel). The levels are constants (the scale is fixed): no gradient
    reaches them.
    """
    levels = levels.detach()
    lo, hi = _interval(w, levels)
    offset = w - (lo + hi) / 2
    half_width = (hi - lo) / 2
    below, above = w < levels[0], w > levels[-1]
    window = (offset >= -half_width / g) & (offset < half_width / g) & ~(below | above)
    y = torch.where(below, 2 * (levels[0] - w),
                    torch.where(above, 2 * (w - levels[-1]), 2 * torch.minimum(w - lo, hi - w)))
    slope = torch.where(below, -2.0, torch.where(above, 2.0, 2 * torch.sign((hi - w) - (w - lo))))
    return y, ~window, slope


def sawtooth(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``Y(w)`` of paper Eq. 8: twice the distance to the nearest level, linear outside the range."""
    return _equations(w, levels, math.inf)[0]


def constrained_mask(w: torch.Tensor, levels: torch.Tensor, g: float) -> torch.Tensor:
    """``ucs(w; g)`` of paper Eq. 10 as a bool tensor: True where the constraint applies."""
    return _equations(w, levels, g)[1]


def constraint(w: torch.Tensor, levels: torch.Tensor, g: float) -> torch.Tensor:
    """``cs(w; g) = ucs(w; g) Y(w)`` (paper Eq. 9). Differentiable in ``w`` through ``Y`` only."""
    y, keep, _ = _equations(w, levels, g)
    return y * keep


def constraint_and_grad(
    w: torch.Tensor, levels: torch.Tensor, g: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cs(w; g)`` and ``d cs / d w`` in closed form, without autograd.

    The slope is ``+2`` on a tent nearer its lower level, ``-2`` nearer its upper one, ``-2`` below
    the range, ``+2`` above it, and 0 in the window: exactly what autograd gives for
    :func:`constraint`, at a fraction of the cost.
    """
    y, keep, slope = _equations(w, levels, g)
    return y * keep, slope * keep
