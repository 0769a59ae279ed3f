"""Metrics: CFS and fraction on levels by hand, their refusal of models with nothing to measure,
and agreement of two networks' predictions."""

import pytest
import torch
import torch.nn as nn

import cbp
from cbp.core import metrics


def _prepared_linear(weights):
    """One quantized Linear (binary, a = mean|W|) between a float first and last layer."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, len(weights)), nn.Linear(len(weights), 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weights))
    return cbp.prepare(model, cbp.CBPConfig(levels="binary"))


def test_cfs_and_fraction_on_levels_by_hand():
    # |W| means 1: levels -1, 1. Y = 2|w - Q(w)|: 0, 0, 2*0.5, 2*0.005 -> cfs = 1.01 / 4
    model = _prepared_linear([[1.0, -1.0], [0.5, -1.5], [1.0, 1.0], [-0.995, -1.005]])
    assert float(model[1].cbp_scale) == pytest.approx(1.0)
    assert cbp.cfs(model) == pytest.approx((0 + 0 + 0 + 0 + 1.0 + 1.0 + 0 + 0 + 0.01 + 0.01) / 8)
    # within 1% of a = 1: all but the 0.5 and -1.5 weights
    assert cbp.fraction_on_levels(model) == pytest.approx(6 / 8)


def test_no_quantized_layer_is_an_error_not_a_score():
    model = _prepared_linear([[1.0, -1.0], [0.5, -1.5]])
    plain = cbp.convert(model)   # its weights sit on the levels, but it holds no levels any more
    for float_model in (plain, nn.Sequential(nn.Linear(2, 2))):
        for metric, name in ((cbp.cfs, "cfs"), (cbp.fraction_on_levels, "fraction_on_levels"),
                             (metrics.report, "cfs")):   # the error names the metric asked for
            match = f"^{name}: the model has no quantized layer.*cbp.agreement"
            with pytest.raises(ValueError, match=match) as info:
                metric(float_model)
            assert "\n" not in str(info.value)
    assert cbp.layer_stats(plain) == []  # per layer: simply no rows


def test_report_holds_cfs_and_fraction_on_levels():
    """The figures every log row and ``cbp evaluate`` show, by the names they are read by."""
    model = _prepared_linear([[1.0, -1.0], [0.5, -1.5], [1.0, 1.0], [-0.995, -1.005]])
    assert metrics.report(model) == {"cfs": pytest.approx(2.02 / 8), "on_levels": pytest.approx(6 / 8)}


def test_agreement_by_hand():
    a = nn.Linear(2, 2, bias=False)
    b = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.eye(2))                          # logits = x
        b.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))  # second logit halved
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0], [1.0, 1.5], [0.0, -1.0]])
    y = torch.tensor([0, 1, 1, 0])
    # a predicts 0, 1, 1, 0; b: 0, 1 (3*0.5 > 1), 0 (0.75 < 1), 0 (-0.5 < 0)
    result = cbp.agreement(a, b, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert (result.samples, result.same_top1, result.correct) == (4, 3, (4, 3))
    assert result.fraction == 0.75
    assert result.max_logit_gap == pytest.approx(1.5)         # 3 vs 1.5
    unlabelled = cbp.agreement(a, b, [x])
    assert (unlabelled.same_top1, unlabelled.correct) == (3, None)
    with pytest.raises(ValueError, match="no inputs"):
        cbp.agreement(a, b, [])
    # one-element tuples hold no labels; a model without parameters runs on the CPU
    single = cbp.agreement(nn.Identity(), b, [(x[:3],), (x[3:],)])
    assert (single.samples, single.same_top1, single.correct) == (4, 3, None)
    assert single.max_logit_gap == pytest.approx(1.5)


def test_agreement_of_a_prepared_model_and_its_converted_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    float_model = model
    model = cbp.prepare(float_model, cbp.CBPConfig(levels="ternary"), inplace=False)
    model.train()
    batches = [torch.randn(32, 6) for _ in range(3)]
    same = cbp.agreement(model, cbp.convert(model), batches)
    assert (same.samples, same.same_top1, same.max_logit_gap) == (96, 96, 0.0)
    assert model.training  # modes are restored
    changed = cbp.agreement(float_model, model, batches)   # quantization changes the outputs
    assert changed.max_logit_gap > 0


# ---- two quantized layers of different sizes (issue 13) ----------------------------------------
# The two layers differ in size and in their own figures, so a mean over layers instead of over
# weights, a missing factor 2 in Y, or a layer left out or counted twice each change the result.
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
    snapped = two_layers()
    with torch.no_grad():
        for layer in cbp.quantized_layers(snapped).values():
            layer.weight.copy_(cbp.quantize(layer.weight, layer.levels))
    assert cbp.cfs(snapped) == 0.0 and cbp.fraction_on_levels(snapped) == 1.0
