"""cbp.core.config: CBPConfig refuses a value that would silently break training, naming the
field, and accepts infinity where it means never."""

from __future__ import annotations

import math

import pytest

import cbp
from cbp.core.config import SettingError, check_number


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
    with pytest.raises(ValueError, match=r"^exclude holds 3, which is not a regular expression: "
                                         r"first argument must be string or compiled pattern$"):
        cbp.CBPConfig(exclude=[3])
    config = cbp.CBPConfig(include=[r"^layer\d\.", "fc"], exclude=[r"downsample"])
    assert (config.include, config.exclude) == ([r"^layer\d\.", "fc"], ["downsample"])


# (value, bounds, the message's requirement or None for accepted), by the rules of check_number
CHECKS = [
    (0, {"above": 0}, "must be a number > 0, got 0"),
    (1e-9, {"above": 0}, None),
    (3, {"above": 0.5}, None),   # an int is a number
    (0.99, {"at_least": 1}, "must be a number >= 1, got 0.99"),
    (1, {"at_least": 1}, None),
    (1, {"above": 0, "at_most": 1}, None),
    (1.5, {"above": 0, "at_most": 1}, "must be a number > 0 and <= 1, got 1.5"),
    (math.nan, {"above": 0, "at_most": 1}, "must be a number > 0 and <= 1, got nan"),
    (2, {"below": 2}, "must be a number < 2, got 2"),
    (1.999, {"below": 2}, None),
    (-1, {"at_least": 0, "below": math.inf}, "must be a finite number >= 0, got -1"),
    (math.inf, {"at_least": 0, "below": math.inf}, "must be a finite number >= 0, got inf"),
    (5.0, {"at_least": 0, "below": math.inf}, None),
    (math.inf, {"at_least": 1e-5}, None),   # no upper bound: infinity means never
    (-math.inf, {}, "must be a number, got -inf"),
    (math.inf, {"at_most": 10}, "must be a number <= 10, got inf"),
    (math.inf, {"below": 10}, "must be a number < 10, got inf"),
    (0.5, {"at_least": 1e-5, "at_most": 0.25}, "must be a number >= 1e-05 and <= 0.25, got 0.5"),
    (2.5, {"at_least": 1, "integer": True}, "must be an integer >= 1, got 2.5"),
    (3, {"at_least": 1, "integer": True}, None),
    (True, {"integer": True}, "must be an integer, got True"),
    (True, {}, "must be a number, got True"),
    ("1", {}, "must be a number, got '1'"),
    (None, {"above": 0, "none_ok": True}, None),
    (None, {"above": 0}, "must be a number > 0, got None"),
    ("a", {"above": 0, "none_ok": True}, "must be a number > 0, or None, got 'a'"),
    (0, {"integer": True, "none_ok": True, "above": 0},
     "must be an integer > 0, or None, got 0"),
]


def test_check_number_says_what_it_wants():
    for value, bounds, requirement in CHECKS:
        if requirement is None:
            check_number("x", value, **bounds)
            continue
        with pytest.raises(SettingError) as info:
            check_number("x", value, **bounds)
        assert (str(info.value), info.value.name, info.value.requirement) == (
            f"x {requirement}", "x", requirement), (value, bounds)


INF = math.inf
BAD_FIELDS = [
    ("multiplier_lr", INF, "multiplier_lr must be a finite number >= 0, got inf"),
    ("p_max", 0, "p_max must be an integer >= 1, got 0"),
    ("g_init", 0.5, "g_init must be a number >= 1, got 0.5"),
    ("stop_once_g_exceeds", 4, "stop_once_g_exceeds must be a number >= 5, or None, got 4"),
    ("lr_drop_at_g", 0, "lr_drop_at_g must be a number > 0, or None, got 0"),
    ("lr_drop_factor", 1.5, "lr_drop_factor must be a number > 0 and <= 1, got 1.5"),
    ("grad_clip_value", 0, "grad_clip_value must be a number > 0, or None, got 0"),
    ("weight_clamp", -1, "weight_clamp must be a number > 0, or None, got -1"),
    ("g_increments", ((10, 1), 5), "g_increments must hold (bound, increment) pairs, got 5"),
    ("g_increments", ((10, 1, 2),), "g_increments must hold (bound, increment) pairs, got (10, 1, 2)"),
    ("g_increments", ((10, 1), (5, 1), (INF, 1)), "a g_increments bound must be a number > 10, got 5"),
    ("g_increments", ((0, 1), (INF, 1)), "a g_increments bound must be a number > 0, got 0"),
    ("g_increments", ((10, 0), (INF, 1)), "a g_increments increment must be a finite number > 0, got 0"),
    ("g_increments", ((10, 1), (100, 10)), "g_increments must end with an infinite bound (else g "
     "would stop growing and the schedule never end), got ((10, 1), (100, 10))"),
    ("g_increments", (), "g_increments must end with an infinite bound (else g would stop growing "
     "and the schedule never end), got ()"),
]


def test_validate_rechecks_a_config_changed_after_construction():
    """Each field's own message; every bound itself is accepted."""
    for name, value, message in BAD_FIELDS:
        config = cbp.CBPConfig(g_init=5)
        setattr(config, name, value)
        with pytest.raises(ValueError) as info:
            config.validate()
        assert str(info.value) == message, name
    edges = cbp.CBPConfig(g_init=5)
    for name, value in (("multiplier_lr", 0), ("p_max", 1), ("stop_once_g_exceeds", 5),
                        ("lr_drop_factor", 1), ("g_increments", ([10, 1], [INF, 100]))):
        setattr(edges, name, value)
    edges.validate()
    assert edges.g_increment(9) == 1 and edges.g_increment(10) == 100
