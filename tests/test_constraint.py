"""Y, the window and cs at hand-computed points (paper Eq. 8-10), and their gradients."""

import math

import pytest
import torch

from cbp.core.constraint import (
    constrained_mask,
    constraint,
    constraint_and_grad,
    level_values,
    quantize,
    sawtooth,
    scaled_levels,
)
from cbp.core.levels import LEVEL_SETS


def levels(name, scale=1.0):
    return torch.tensor(LEVEL_SETS[name], dtype=torch.float64) * scale


# (level set, w, Y(w)) worked out by hand: 2 * distance to the nearest level inside the range,
# 2 * distance to the outer level outside it.
Y_POINTS = [
    ("binary", 0.0, 2.0), ("binary", 0.5, 1.0), ("binary", -0.25, 1.5), ("binary", 1.0, 0.0),
    ("binary", 1.5, 1.0), ("binary", -2.0, 2.0),
    ("ternary", 0.5, 1.0), ("ternary", 0.25, 0.5), ("ternary", -0.75, 0.5), ("ternary", 0.0, 0.0),
    ("ternary", -1.25, 0.5),
    ("shift1", 0.6, 0.2), ("shift1", 0.75, 0.5), ("shift1", -0.1, 0.2), ("shift1", 1.1, 0.2),
    ("shift2", 0.3, 0.1), ("shift2", 0.8, 0.4), ("shift2", -0.125, 0.25), ("shift2", -3.0, 4.0),
]


@pytest.mark.parametrize("name, w, expected", Y_POINTS)
def test_sawtooth_hand_values(name, w, expected):
    assert sawtooth(torch.tensor([w], dtype=torch.float64), levels(name)).item() == pytest.approx(expected)


def test_sawtooth_scales_with_the_levels():
    w = torch.tensor([0.0, 0.25, 0.75], dtype=torch.float64)
    assert sawtooth(w, levels("binary", 0.5)).tolist() == pytest.approx([1.0, 0.5, 0.5])


# (level set, g, w, cs(w; g)): the window is [m - h/(2g), m + h/(2g)) inside each interval.
CS_POINTS = [
    ("binary", 2, 0.25, 0.0), ("binary", 2, -0.5, 0.0), ("binary", 2, 0.5, 1.0),
    ("binary", 2, 0.75, 0.5), ("binary", 2, 1.5, 1.0), ("binary", 4, 0.25, 1.5),
    ("binary", 4, 0.2, 0.0),
    ("ternary", 2, 0.25, 0.0), ("ternary", 2, 0.75, 0.5), ("ternary", 2, -0.75, 0.0),
    ("ternary", 2, 0.1, 0.2), ("ternary", 2, -1.5, 1.0),
    ("shift1", 2, 0.6, 0.2), ("shift1", 2, 0.7, 0.0), ("shift1", 2, 0.875, 0.25),
    ("shift2", 2, 0.3, 0.1), ("shift2", 2, 0.35, 0.0), ("shift2", 2, 0.3125, 0.0),
    ("shift2", 3, 0.55, 0.1),
]


@pytest.mark.parametrize("name, g, w, expected", CS_POINTS)
def test_constraint_hand_values(name, g, w, expected):
    got = constraint(torch.tensor([w], dtype=torch.float64), levels(name), g).item()
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("name", [name for name, q in LEVEL_SETS.items() if len(q) > 2])
def test_a_weight_on_a_level_takes_the_interval_above_it_and_the_top_level_the_last(name):
    """``[lo, hi)``: on a level the tent rises (slope +2) at g = 2, and at g = 1 that interval's
    window frees it (the one below would not: its window ends before its upper level). Scale 1:
    the levels are powers of two, so the window's edges fall on them exactly."""
    q = levels(name)
    interior = q[1:-1]
    cs, grad = constraint_and_grad(interior, q, 2.0)
    assert torch.all(cs == 0) and torch.all(grad == 2.0)
    assert torch.all(constraint_and_grad(interior, q, 1.0)[1] == 0)
    # the outermost levels are inside the range: the tent rises from the bottom one and falls to
    # the top one (the outer arms start beyond them)
    cs, grad = constraint_and_grad(q[[0, -1]], q, 2.0)
    assert torch.all(cs == 0) and grad.tolist() == [2.0, -2.0]


@pytest.mark.parametrize("name", LEVEL_SETS)
def test_g1_frees_the_whole_range_but_not_the_outer_arms(name):
    q = levels(name, 0.7)
    w = torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64)
    cs = constraint(w, q, 1.0)
    inside = (w >= q[0]) & (w <= q[-1])
    assert torch.all(cs[inside] == 0)
    assert torch.allclose(cs[~inside], sawtooth(w[~inside], q))
    assert torch.all(cs[~inside] > 0)


@pytest.mark.parametrize("name", LEVEL_SETS)
def test_no_window_when_g_is_infinite_or_huge(name):
    q = levels(name)
    w = torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64)
    assert torch.equal(constraint(w, q, math.inf), sawtooth(w, q))
    midpoints = (q[1:] + q[:-1]) / 2
    away = (w[:, None] - midpoints).abs().min(dim=1).values > 1e-6
    assert torch.equal(constraint(w, q, 1e9)[away], sawtooth(w, q)[away])


@pytest.mark.parametrize("name", LEVEL_SETS)
def test_window_shrinks_monotonically_with_g(name):
    q = levels(name)
    w = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    constrained = [constrained_mask(w, q, g).sum().item() for g in (1, 2, 5, 10, 100)]
    assert constrained == sorted(constrained) and constrained[0] < constrained[-1]


@pytest.mark.parametrize("name", LEVEL_SETS)
@pytest.mark.parametrize("g", [1.0, 2.0, 7.0, math.inf])
def test_gradient_matches_finite_differences_away_from_kinks(name, g):
    q = levels(name)
    torch.manual_seed(0)
    w = (torch.rand(400, dtype=torch.float64) * 3 - 1.5)
    # Kinks: levels, midpoints, window edges. Keep points at least 1e-3 from all of them.
    h = q[1:] - q[:-1]
    m = (q[1:] + q[:-1]) / 2
    kinks = torch.cat([q, m, m - h / (2 * g), m + h / (2 * g)])
    w = w[(w[:, None] - kinks).abs().min(dim=1).values > 1e-3].requires_grad_()
    lam = torch.rand_like(w)
    (lam * constraint(w, q, g)).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        fd = lam * (constraint(w + eps, q, g) - constraint(w - eps, q, g)) / (2 * eps)
    assert torch.allclose(w.grad, fd, atol=1e-6)
    assert set(w.grad[lam > 0].div(lam[lam > 0]).round().unique().tolist()) <= {-2.0, 0.0, 2.0}


def test_no_gradient_flows_into_the_scale():
    """The levels are fixed (a = mean|W| of the pretrained weights): cs is differentiable in w
    only, even when the levels handed in are part of a graph."""
    scale = torch.tensor(0.5, requires_grad=True)
    q = torch.tensor([-1.0, 1.0]) * scale
    w = torch.tensor([0.1, 0.9, 1.4], requires_grad=True)
    (constraint(w, q, 2.0).sum() + sawtooth(w, q).sum()).backward()
    assert scale.grad is None
    # levels -0.5, 0.5: 0.1 lies in the g = 2 window (cs flat, Y falls towards 0.5); 0.9 and 1.4
    # on the upper outer arm
    assert w.grad.tolist() == [0.0 - 2.0, 2.0 + 2.0, 2.0 + 2.0]


def test_level_values_of_one_scale_however_it_is_shaped():
    """A per-layer scale is 0-d in a layer, but an export's reader takes any one-element scale
    (``(1,)``, ``(1, 1)``): each gives every index its level, shaped like the index."""
    factors = torch.tensor(LEVEL_SETS["shift1"])
    index = torch.tensor([[0, 4, 2, 1], [3, 3, 0, 4], [1, 2, 4, 0]])
    expected = torch.tensor([[-2.0, 2.0, 0.0, -1.0], [1.0, 1.0, -2.0, 2.0], [-1.0, 0.0, 2.0, -2.0]])
    for shape in [(), (1,), (1, 1)]:
        values = level_values(index, scaled_levels(factors, torch.full(shape, 2.0)))
        assert values.shape == index.shape and torch.equal(values, expected), shape


def test_quantize_sends_an_exact_midpoint_to_the_lower_level():
    q = levels("shift1")
    w = torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64)   # every midpoint
    assert quantize(w, q).tolist() == [-1.0, -0.5, 0.0, 0.5]


def test_quantize_nearest_level_clipped():
    q = levels("shift1")
    w = torch.tensor([-3.0, -0.74, -0.76, 0.1, 0.26, 0.24, 0.9, 5.0], dtype=torch.float64)
    assert quantize(w, q).tolist() == [-1.0, -0.5, -1.0, 0.0, 0.5, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", LEVEL_SETS)
def test_constraint_is_never_negative_and_exactly_zero_on_levels(name):
    # Adam normalises the multiplier gradient, so even -1e-16 would lower lambda by a full step.
    q = levels(name, 0.0731).float()
    w = torch.cat([q, torch.linspace(-0.2, 0.2, 2001)])
    for g in (1.0, 3.0, math.inf):
        cs = constraint(w, q, g)
        assert torch.all(cs >= 0)
        assert torch.all(cs[: len(q)] == 0)


def where_chain(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The plain form of ``quantize``: ``q = where(w > m_k, q_{k+1}, q)`` over the midpoints."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    q = levels[0].expand_as(w)
    for k in range(len(midpoints)):
        q = torch.where(w > midpoints[k], levels[k + 1], q)
    return q


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("factors", [(-1.0, 1.0), (-1.0, 0.0, 1.0), LEVEL_SETS["shift2"],
                                     (-2.0, -0.5, -0.0, 1.0, 3.0), tuple(range(-128, 128))])
def test_quantize_is_the_where_chain_bit_for_bit(dtype, factors):
    levels = (torch.tensor(factors, dtype=torch.float32) * 0.37).to(dtype)
    mids = (levels[1:] + levels[:-1]) / 2
    special = torch.cat([levels, mids, torch.nextafter(mids, mids + 1),
                         torch.nextafter(mids, mids - 1),
                         torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)])
    w = torch.cat([special, (torch.randn(3000) * 40).to(dtype)])
    assert torch.equal(raw_bytes(quantize(w, levels)), raw_bytes(where_chain(w, levels)))
    conv = torch.randn(8, 4, 3, 3).to(dtype).to(memory_format=torch.channels_last)
    q = quantize(conv, levels)
    assert q.dtype == dtype and q.stride() == conv.stride()
    assert torch.equal(raw_bytes(q), raw_bytes(where_chain(conv, levels)))
