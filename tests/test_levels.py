import math

import pytest
import torch

import cbp


def test_aliases_have_the_published_factors():
    assert cbp.resolve_factors("binary") == (-1, 1)
    assert cbp.resolve_factors("ternary") == (-1, 0, 1)
    assert cbp.resolve_factors("shift1") == (-1, -0.5, 0, 0.5, 1)
    assert cbp.resolve_factors("shift2") == (-1, -0.5, -0.25, 0, 0.25, 0.5, 1)


def test_custom_set_accepted_from_list_and_tensor():
    assert cbp.resolve_factors([-2, 0.5, 3]) == (-2.0, 0.5, 3.0)
    assert cbp.resolve_factors(torch.tensor([-1.0, 1.0])) == (-1.0, 1.0)


@pytest.mark.parametrize("bad, message", [
    ([], "at least two"), ([1.0], "at least two"), ([1, 0], "increasing"),
    ([0, 1, 1], "increasing"), ([0, math.nan], "finite"), ([0, math.inf], "finite"),
    (["a", "b"], "numbers"),
    ("quaternary", "unknown level set .quaternary.; choose one of binary, ternary, shift1, shift2 "),
])
def test_invalid_sets_raise_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        cbp.CBPConfig(levels=bad)


@pytest.mark.parametrize("n, bits", [(2, 1), (3, 46 / 29), (4, 2), (5, 7 / 3), (7, 45 / 16), (8, 3)])
def test_bits_per_weight_is_what_the_export_stores(n, bits):
    """The density of the file's packing (cbp.files.packing docstring), between log2 k and ceil(log2 k)."""
    assert cbp.bits_per_weight(n) == pytest.approx(bits)
    assert math.log2(n) <= cbp.bits_per_weight(n) <= math.ceil(math.log2(n))


F32_MAX = torch.finfo(torch.float32).max   # 3.4028e38; F32_MAX / 2 is exact


@pytest.mark.parametrize("factors, refused", [
    ((-1e-50, 1e-50), True),               # both round to 0 in float32
    ((1.0, 1.0 + 2**-25), True),           # round to the same float32 (spacing 2**-23 at 1)
    ((0.0, 1.0, 1.0 + 2**-25), True),      # ... also when the pair that collapses is not the first
    ((1.0, 1.0 + 2**-23), False),          # adjacent float32 values: distinct
    ((-1e39, 1e39), True),                 # overflow to inf
    ((1e38, 3e38), True),                  # midpoint: 4e38 overflows
    ((0.0, 1e38, 3e38), True),             # ... in the second interval
    ((1e38, 1.5e38), False),               # midpoint 1.25e38 is finite
    ((-3e38, 3e38), True),                 # spacing 6e38 overflows
    ((-3e38, 0.0, 3e38), False),           # each spacing 3e38 fits
    ((-F32_MAX / 2, F32_MAX / 2), False),  # spacing exactly the float32 maximum fits
])
def test_level_factors_float32_cannot_keep_apart_are_refused(factors, refused):
    if not refused:
        assert cbp.resolve_factors(factors) == factors
        return
    with pytest.raises(ValueError) as info:
        cbp.resolve_factors(factors)
    assert str(info.value).startswith(f"level factors {factors} collapse or overflow in float32 (become ")
