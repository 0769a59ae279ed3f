"""cbp.core.config: CBPConfig refuses a value that would silently break training, naming the
field, and accepts infinity where it means never."""

from __future__ import annotations

import math

import pytest

import cbp


@pytest.mark.parametrize("field, value", [
    ("grad_clip_value", -1.0), ("weight_clamp", -1.0), ("lr_drop_factor", math.nan),
    ("lr_drop_factor", 0.0), ("multiplier_lr", math.inf), ("p_max", 2.5), ("g_init", 0.5),
    ("stop_once_g_exceeds", math.nan), ("lr_drop_at_g", -1.0),
    ("g_increments", ((10, 1), (100, 10))), ("g_increments", ((10, -1), (math.inf, 100))),
])
def test_cbpconfig_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}|^a g_increments"):
        cbp.CBPConfig(**{field: value})


def test_cbpconfig_accepts_infinity_where_it_means_never():
    config = cbp.CBPConfig(g_init=math.inf, stop_once_g_exceeds=None, lr_drop_at_g=math.inf,
                           grad_clip_value=math.inf, weight_clamp=None)
    assert config.g_init == math.inf


def test_cbpconfig_refuses_a_pattern_that_is_no_regular_expression():
    with pytest.raises(ValueError, match=r"include holds '\(', which is not a regular expression"):
        cbp.CBPConfig(include=["("])
    with pytest.raises(ValueError, match="exclude must be a list of regular expressions, not one"):
        cbp.CBPConfig(exclude=r"^fc$")
