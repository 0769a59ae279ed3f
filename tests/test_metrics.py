"""Metrics: CFS and fraction on levels by hand, their refusal of models with nothing to measure,
and agreement of two networks' predictions."""

import pytest
import torch
import torch.nn as nn

import cbp


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
        for metric in (cbp.cfs, cbp.fraction_on_levels):
            with pytest.raises(ValueError, match="no quantized layer.*cbp.agreement") as info:
                metric(float_model)
            assert "\n" not in str(info.value)
    assert cbp.layer_stats(plain) == []  # per layer: simply no rows


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
