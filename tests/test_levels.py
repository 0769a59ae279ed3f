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


@pytest.mark.parametrize("n, bits", [(2, 1), (3, 2), (4, 2), (5, 3), (7, 3), (8, 3), (9, 4)])
def test_bits_per_weight(n, bits):
    assert cbp.bits_per_weight(n) == bits
