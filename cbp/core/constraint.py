"""The sawtooth constraint of paper Eq. 8-10 and its gradient, written once.

All functions take real-valued weights ``w`` and ``levels`` (absolute values, factors times scale,
:func:`scaled_levels`) sorted along dimension 0, and work elementwise: a 1-D tensor of a layer's
levels, or ``(n_levels, out, 1, ...)`` with one column of levels per output channel, so that
``levels[k]`` broadcasts against ``w``. With ``lo, hi`` the levels around ``w`` and ``m`` their
midpoint:

* ``Y(w) = 2 |w - Q(w)|`` inside ``[q_1, q_n]`` (a tent ``2 min(w - lo, hi - w)``), and the outer
  arms ``2 (q_1 - w)`` below and ``2 (w - q_n)`` above;
* the unconstrained-weight window is ``m - h/(2g) <= w < m + h/(2g)`` with ``h = hi - lo``
  (the paper's ``|w - m + eps| < h/(2g)``, ``eps -> 0+``); the outer arms are never windowed;
* ``cs(w; g) = ucs(w; g) Y(w)`` with ``ucs = 0`` inside the window, 1 outside.

:func:`_equations` is the only place these are written; the public functions, the closed-form
gradient and the fused kernel of :mod:`cbp.core.penalty` all read them from there, so every path
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


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def scaled_levels(factors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The levels of a layer: ``factors * scale`` with the levels along dimension 0.

    ``scale`` is a 0-d tensor (one per layer: a 1-D result) or ``(out, 1, ...)``, one per output
    channel shaped to broadcast against the weight (``(n_levels, out, 1, ...)``). Every path that
    needs a layer's levels - the forward, the penalty, the metrics, the export - takes them from
    here, so they are the same bits everywhere.
    """
    return factors.reshape(-1, *([1] * scale.dim())) * scale


def level_index(w: torch.Tensor, levels: torch.Tensor,
                dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Index of each weight's nearest level (the one :func:`quantize` gives): the number of
    midpoints it lies above, so an exact midpoint goes down. int8 by default, which holds 128
    levels; the export asks for int64."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    index = torch.zeros(w.shape, dtype=dtype, device=w.device)
    for mid in midpoints:
        index += w > mid
    return index


def level_values(index: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The level each index names, for ``index`` shaped like the weights (per-channel levels:
    each weight's own channel's)."""
    if levels.dim() == 1:
        return levels[index]
    table = levels.reshape(levels.shape[0], -1).t()              # (out, n_levels)
    return table.gather(1, index.reshape(table.shape[0], -1)).view(index.shape)


def quantize(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level, clipped to ``[q_1, q_n]``; an exact midpoint goes to the lower level.

    The level is chosen on the bit patterns: with ``c_k = w > m_k`` for the sorted midpoints
    ``m_k`` (true for the first ``i`` of them when ``w`` is nearest level ``i``), the telescoping
    XOR ``q_1 ^ c_1 (q_1 ^ q_2) ^ ... ^ c_{n-1} (q_{n-1} ^ q_n)`` is exactly ``q_{i+1}``'s bits.
    That is the chain ``q = where(w > m_k, q_{k+1}, q)``, bit for bit (NaN goes to ``q_1``, a
    ``-0.0`` level stays so), at four cheap integer passes per midpoint: ``torch.where`` is not
    vectorised on CPU (a binary ResNet-18's weights: 2 ms against 17 ms). Like ``where`` and
    unlike ``bucketize``, it keeps the weight's memory format (channels-last stays so).
    """
    midpoints = (levels[1:] + levels[:-1]) / 2
    bits = levels.view(_SAME_SIZE_INT[levels.element_size()])
    steps = bits[1:] ^ bits[:-1]
    q = torch.gt(w, midpoints[0]).to(bits.dtype).mul_(steps[0])
    for k in range(1, len(midpoints)):
        q ^= torch.gt(w, midpoints[k]).to(bits.dtype).mul_(steps[k])
    return q.bitwise_xor_(bits[0]).view(levels.dtype)


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
