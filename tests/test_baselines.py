"""cbp.core.baselines: BatchNorm re-estimation and post-training rounding.

The re-estimated statistics are checked against statistics computed by hand.
"""

import pytest
import torch
import torch.nn as nn

import cbp
from cbp.core.baselines import post_training_rounding, recalibrate_bn, require_batch_norm


def test_recalibrate_bn_is_the_plain_average_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, momentum=0.3))
    model.eval()
    batches = [torch.randn(4, 1, 3, 3) * (i + 1) for i in range(3)]
    recalibrate_bn(model, [(x, None) for x in batches], batches=2)
    with torch.no_grad():
        acts = [model[0](x) for x in batches[:2]]
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts]).mean(0)
    bn = model[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.3 and not model.training


def test_recalibrate_bn_rejects_bad_input():
    with pytest.raises(ValueError, match="batches must be >= 1"):
        recalibrate_bn(nn.BatchNorm1d(2), [], 0)
    with pytest.warns(UserWarning, match="no BatchNorm"):   # issue 26: nothing to do, said
        recalibrate_bn(nn.Linear(2, 2), [torch.zeros(1, 2)], 1)
    with pytest.raises(ValueError, match="fewer than"):
        recalibrate_bn(nn.BatchNorm1d(2), [torch.randn(3, 2)], 2)


def test_post_training_rounding_forward_is_the_converted_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    data = [torch.randn(8, 3) for _ in range(3)]
    post_training_rounding(model, cbp.CBPConfig("ternary"), data, batches=3).eval()
    plain = cbp.convert(model)
    levels = model[1].levels
    assert set(plain[1].weight.unique().tolist()) <= set(levels.tolist())
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_recalibrate_bn_on_a_model_without_batchnorm_warns_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no BatchNorm layer .* the model is unchanged"):
        assert cbp.recalibrate_bn(model, [torch.randn(2, 4)], batches=1) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8),
                        nn.Linear(8, 2))
    net[1].running_mean.fill_(0.5)
    return net


def test_a_failing_loader_leaves_the_model_as_it_was():
    def loader():
        yield torch.randn(4, 4)
        raise OSError("disk gone")
    model = _bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match="disk gone"):
        cbp.recalibrate_bn(model, loader(), batches=2)   # statistics restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(OSError, match="disk gone"):
        post_training_rounding(model, cbp.CBPConfig(), loader(), batches=2)
    assert not cbp.quantized_layers(model)   # not prepared either
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fewer than the 3 asked for"):
        cbp.recalibrate_bn(model, [torch.randn(4, 4)], batches=3)
    assert torch.equal(model[1].running_mean, before["1.running_mean"])


def test_post_training_rounding_prepares_and_recalibrates_in_place():
    model, batch = _bn_net(), torch.randn(16, 4)
    rounded = cbp.post_training_rounding(model, cbp.CBPConfig(), [batch], batches=1)
    assert rounded is model and list(cbp.quantized_layers(model)) == ["2"]
    with torch.no_grad():   # BatchNorm 1 saw the float layer 0's outputs of the batch
        torch.testing.assert_close(model[1].running_mean, model[0](batch).mean(0))


def test_require_batch_norm_refuses_an_option_on_a_model_without_one():
    with pytest.raises(ValueError, match="--recalibrate-bn: the model has no BatchNorm layer.*"
                                         "drop --recalibrate-bn"):
        require_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "--recalibrate-bn")
    require_batch_norm(_bn_net(), "--recalibrate-bn")   # has one: nothing to say


def test_post_training_rounding_defaults_to_50_batches_and_without_a_loader_only_prepares():
    model, batch = _bn_net(), torch.randn(16, 4)
    post_training_rounding(model, cbp.CBPConfig("ternary"), [batch] * 50)   # exactly 50: enough
    assert model[2].cbp_factors.tolist() == [-1.0, 0.0, 1.0]
    plain = _bn_net()
    statistics_before = plain[1].running_mean.clone()
    assert post_training_rounding(plain, cbp.CBPConfig("ternary")) is plain
    assert plain[2].cbp_factors.tolist() == [-1.0, 0.0, 1.0]   # the config's levels
    assert torch.equal(plain[1].running_mean, statistics_before)   # no loader: not re-estimated


def test_recalibrate_bn_changes_only_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    cbp.prepare(model, cbp.CBPConfig("binary"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cbp.recalibrate_bn(model, [(torch.randn(8, 1, 8, 8) * 3 + 1, None) for _ in range(3)], 3)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{s}" for i in (1, 4) for s in ("running_mean", "running_var",
                                                             "num_batches_tracked")}
