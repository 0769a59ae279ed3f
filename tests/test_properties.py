"""Invariants that must hold for any input (hypothesis): quantize, the sawtooth, bit packing."""

import math
import os

import torch
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st

from cbp.core.constraint import constrained_mask, constraint, constraint_and_grad, quantize, sawtooth
from cbp.files.packing import field_grouping, grouping, pack_indices, unpack_indices

# The same examples on every run (no flaky test, no example database); under mutation testing
# (scripts/mutation.sh) a failure is not shrunk: any failure kills the mutant.
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)
finite = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def level_sets(draw) -> torch.Tensor:
    """2 to 9 sorted levels at least 1e-3 apart (any spacing, not only the published sets)."""
    values = draw(st.lists(st.floats(-4.0, 4.0, width=64), min_size=2, max_size=9, unique=True))
    values = sorted(values)
    assume(min(b - a for a, b in zip(values, values[1:])) >= 1e-3)
    return torch.tensor(values, dtype=torch.float64)


def weights(draw_from=finite) -> st.SearchStrategy:
    return st.lists(draw_from, min_size=1, max_size=40).map(
        lambda ws: torch.tensor(ws, dtype=torch.float64))


@FAST
@given(level_sets(), weights())
def test_quantize_lands_on_a_nearest_level_and_is_idempotent(levels, w):
    q = quantize(w, levels)
    assert torch.isin(q, levels).all()
    assert torch.equal(quantize(q, levels), q)
    nearest = (w[:, None] - levels).abs().min(dim=1).values
    assert torch.all((w - q).abs() <= nearest * (1 + 1e-12) + 1e-12)


@FAST
@given(level_sets(), weights())
def test_sawtooth_is_zero_exactly_on_the_levels(levels, w):
    on_levels = sawtooth(levels, levels)
    assert torch.all(on_levels == 0)
    off = ~torch.isin(w, levels)
    assert torch.all(sawtooth(w, levels)[off] > 0)
    # twice the distance to the nearest level inside the range, to the outer level outside it
    distance = (w - quantize(w, levels)).abs()
    assert torch.allclose(sawtooth(w, levels), 2 * distance, rtol=1e-12, atol=1e-12)


@FAST
@given(level_sets(), weights(), st.sampled_from([1.0, 1.5, 2.0, 7.0, 100.0, math.inf]))
def test_slope_is_plus_or_minus_two_outside_the_window_and_zero_inside(levels, w, g):
    midpoints = (levels[1:] + levels[:-1]) / 2
    kinks = torch.cat([levels, midpoints])
    w = w[(w[:, None] - kinks).abs().min(dim=1).values > 1e-9]   # no derivative at a kink
    w.requires_grad_(True)
    constraint(w, levels, g).sum().backward()
    constrained = constrained_mask(w.detach(), levels, g)
    # away from the nearest level Y grows: the slope is 2 * sign(w - Q(w)) where constrained
    away = 2 * torch.sign(w.detach() - quantize(w.detach(), levels))
    assert torch.equal(w.grad, torch.where(constrained, away, torch.zeros_like(away)))
    _, slope = constraint_and_grad(w.detach(), levels, g)
    assert torch.equal(slope, w.grad)


@FAST
@given(st.integers(2, 256), st.booleans(), st.data())
def test_packing_round_trips_any_index_array(k, fields, data):
    layout = field_grouping(k) if fields else grouping(k)
    count = data.draw(st.integers(0, 200))
    values = data.draw(st.lists(st.integers(0, k - 1), min_size=count, max_size=count))
    indices = torch.tensor(values, dtype=torch.int64)
    packed = pack_indices(indices, layout)
    bits = layout.stream_bits(count)
    assert packed.dtype == torch.uint8 and packed.numel() == layout.nbytes(count)
    assert packed.numel() == math.ceil(bits / 8)
    assert torch.equal(unpack_indices(packed, layout, count), indices)
    if bits % 8:   # the unused high bits of the last byte are zero: one file per model
        assert int(packed[-1]) >> (bits % 8) == 0
