"""CFS (paper Eq. 19) and the on-level fraction on two layers of different sizes, by hand.

The two layers differ in size and in their own figures, so a mean over layers instead of over
weights, a missing factor 2 in Y, or a layer left out or counted twice each change the result.
"""

import pytest
import torch
import torch.nn as nn

import cbp
from cbp import metrics

# Binary levels: layer "0" (2 weights) has scale 1, layer "1" (6 weights) scale 0.5, so its
# levels are -0.5 and 0.5. Layer "2" is not quantized: its weights, far from any level, must not
# count.
SMALL = [0.5, 1.0]                              # Y = 1, 0;       |w - Q| / a = 0.5, 0
LARGE = [0.5, -0.5, 0.25, 0.0, 0.75, -0.49]     # Y = 0, 0, 0.5, 1, 0.5, 0.02
# |w - Q| = 0, 0, 0.25, 0.5 (0 is a midpoint: it goes to -0.5), 0.25 (clipped to 0.5), 0.01


def two_layers() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 3, bias=False),
                          nn.Linear(3, 1, bias=False))
    cbp.prepare(model, cbp.CBPConfig(levels="binary", skip_first_last=False, exclude=["^2$"]))
    with torch.no_grad():
        for layer, weights, scale in ((model[0], SMALL, 1.0), (model[1], LARGE, 0.5)):
            layer.weight.copy_(torch.tensor(weights).view_as(layer.weight))
            layer.cbp_scale.fill_(scale)
        model[2].weight.fill_(7.3)
    return model


def test_cfs_is_the_mean_of_y_over_all_quantized_weights():
    # (1 + 0) + (0 + 0 + 0.5 + 1 + 0.5 + 0.02) over 8 weights; the mean over layers would be
    # (0.5 + 2.02 / 6) / 2 = 0.418, without the factor 2: 0.189.
    assert cbp.cfs(two_layers()) == pytest.approx(3.02 / 8, rel=1e-6)


def test_fraction_on_levels_counts_weights_not_layers():
    model = two_layers()
    # within 1% of the scale: 1.0 of the small layer; 0.5 and -0.5 of the large one (-0.49 is
    # 0.01 away, over 0.005): 3 of 8. The mean over layers would be (1/2 + 2/6) / 2.
    assert cbp.fraction_on_levels(model) == pytest.approx(3 / 8)
    # within half the scale (boundaries included): all but 0.0 of the large layer
    assert cbp.fraction_on_levels(model, tolerance=0.5) == pytest.approx(7 / 8)
    assert cbp.fraction_on_levels(model, tolerance=0.0) == pytest.approx(3 / 8)


def test_layer_stats_rows_by_hand():
    rows = metrics.layer_stats(two_layers())
    assert [(r["layer"], r["weights"], r["scale"]) for r in rows] == [("0", 2, 1.0), ("1", 6, 0.5)]
    assert [r["cfs"] for r in rows] == pytest.approx([1 / 2, 2.02 / 6], rel=1e-6)
    # mean |w - Q(w)| in units of the layer's scale
    assert [r["mean_distance"] for r in rows] == pytest.approx([0.5 / 2, 1.01 / 6 / 0.5], rel=1e-6)
    assert [r["on_levels"] for r in rows] == pytest.approx([1 / 2, 2 / 6])


def test_a_model_on_its_levels_scores_zero_and_one():
    model = cbp.convert(two_layers())   # plain layers: nothing quantized is left to score
    assert cbp.cfs(model) == 0.0 and cbp.fraction_on_levels(model) == 0.0
    snapped = two_layers()
    with torch.no_grad():
        for layer in cbp.quantized_layers(snapped).values():
            layer.weight.copy_(cbp.quantize(layer.weight, layer.levels))
    assert cbp.cfs(snapped) == 0.0 and cbp.fraction_on_levels(snapped) == 1.0
