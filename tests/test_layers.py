"""prepare / convert: layer selection, the straight-through forward, plain-model conversion."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import cbp
from cbp.core.constraint import quantize


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3),
    )


def test_resnet18_default_selection_skips_first_conv_and_fc():
    model = cbp.prepare(torchvision.models.resnet18(), cbp.CBPConfig())
    quantized = cbp.quantized_layers(model)
    assert len(quantized) == 19
    assert sum("downsample" in n for n in quantized) == 3
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert all(isinstance(m, nn.Conv2d) for m in quantized.values())
    # BatchNorm stays float; the weights keep their state_dict names.
    assert type(model.bn1) is nn.BatchNorm2d
    assert set(torchvision.models.resnet18().state_dict()) <= set(model.state_dict())


def test_selection_by_filter_fn_and_regexes():
    model = torchvision.models.resnet18()
    only_downsample = cbp.CBPConfig(filter_fn=lambda m, name: "downsample" in name)
    assert len(cbp.select_layers(model, only_downsample)) == 3
    layer4 = cbp.CBPConfig(include=[r"^layer4\."], exclude=[r"downsample"])
    assert cbp.select_layers(model, layer4) == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    everything = cbp.CBPConfig(skip_first_last=False)
    assert len(cbp.select_layers(model, everything)) == 21


def test_no_layer_left_and_double_prepare_are_clear_errors():
    with pytest.raises(ValueError, match="no layer left"):
        cbp.prepare(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    model = cbp.prepare(small_net())
    with pytest.raises(ValueError, match="already prepared"):
        cbp.prepare(model)


def test_scale_is_mean_abs_of_pretrained_weights_and_fixed():
    net = small_net()
    expected = net[3].weight.abs().mean().item()
    model = cbp.prepare(net, cbp.CBPConfig(levels="ternary"))
    layer = model[3]
    assert layer.cbp_scale.item() == pytest.approx(expected)
    assert layer.levels.tolist() == pytest.approx([-expected, 0, expected])
    with torch.no_grad():
        layer.weight.mul_(3)
    assert layer.cbp_scale.item() == pytest.approx(expected)
    assert not layer.cbp_scale.requires_grad


def test_ste_forward_uses_nearest_level_and_backward_is_identity():
    model = cbp.prepare(small_net(), cbp.CBPConfig(levels="shift2"))
    layer = model[3]
    x = torch.randn(2, 4, 6, 6)
    out = layer(x)
    wq = quantize(layer.weight.detach(), layer.levels)
    assert torch.equal(out, F.conv2d(x, wq))
    assert set(wq.unique().tolist()) <= set(layer.levels.tolist())
    upstream = torch.randn_like(out)
    out.backward(upstream)
    wq_leaf = wq.clone().requires_grad_()
    F.conv2d(x, wq_leaf).backward(upstream)
    assert torch.equal(layer.weight.grad, wq_leaf.grad)


def test_prepared_model_keeps_parameters_optimizers_and_trains():
    net = small_net()
    params_before = list(net.parameters())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    model = cbp.prepare(net)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    before = model[3].weight.detach().clone()
    F.cross_entropy(model(torch.randn(4, 1, 9, 9)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert not torch.equal(before, model[3].weight)


@pytest.mark.parametrize("levels", ["binary", "ternary", "shift1", "shift2", [-1.0, 0.0, 2.0]])
def test_convert_gives_plain_layers_on_levels_with_identical_outputs(levels):
    model = cbp.prepare(small_net(), cbp.CBPConfig(levels=levels)).eval()
    x = torch.randn(3, 1, 9, 9)
    plain = cbp.convert(model)
    assert not cbp.quantized_layers(plain)
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules()
               if m is not plain)
    assert torch.equal(plain(x), model(x))
    for name, layer in cbp.quantized_layers(model).items():
        values = set(plain.get_submodule(name).weight.unique().tolist())
        assert values <= set(layer.levels.tolist())
    assert "3.cbp_scale" not in plain.state_dict()
    assert cbp.quantized_layers(model)  # the original is untouched


def test_prepare_in_place_by_default_or_on_a_copy():
    net = small_net()
    float_weight = net[3].weight.detach().clone()
    assert cbp.prepare(net) is net and isinstance(net[3], cbp.QuantizedLayer)

    net = small_net()
    before = net[3].weight
    copy = cbp.prepare(net, cbp.CBPConfig(), inplace=False)
    assert copy is not net and isinstance(copy[3], cbp.QuantizedLayer)
    assert not cbp.quantized_layers(net) and net[3].weight is before  # the original untouched
    assert copy[3].weight is not before and torch.equal(copy[3].weight, float_weight)
    with torch.no_grad():
        copy[3].weight.add_(1.0)  # training the copy does not move the original
    assert torch.equal(net[3].weight, float_weight)
    with pytest.raises(ValueError, match="already prepared"):  # checked before copying
        cbp.prepare(copy, inplace=False)


def test_every_layer_type_forwards_its_quantized_weight():
    """Conv1d/2d/3d and Linear: the output is the float layer's with the weight on its levels."""
    torch.manual_seed(0)
    layers = [(nn.Conv1d(2, 3, 3, bias=True), torch.randn(2, 2, 7), F.conv1d),
              (nn.Conv2d(2, 3, 3, bias=False), torch.randn(2, 2, 5, 5), F.conv2d),
              (nn.Conv3d(2, 3, 2, bias=True), torch.randn(2, 2, 3, 3, 3), F.conv3d),
              (nn.Linear(4, 3), torch.randn(2, 4), F.linear)]
    for layer, x, functional in layers:
        model = cbp.prepare(nn.Sequential(layer), cbp.CBPConfig("ternary", skip_first_last=False))
        quant = model[0]
        wq = quantize(quant.weight.detach(), quant.levels)
        assert set(wq.unique().tolist()) <= set(quant.levels.tolist())
        assert torch.equal(model(x), functional(x, wq, quant.bias)), type(layer).__name__


def test_prepared_state_dict_has_no_shared_tensors(tmp_path):
    """Hugging Face's save_pretrained writes safetensors, which refuses tensors sharing memory:
    every layer owns its copy of the factors."""
    from safetensors.torch import load_file, save_file
    model = cbp.prepare(small_net(), cbp.CBPConfig(levels="ternary", skip_first_last=False))
    assert len(cbp.quantized_layers(model)) > 1
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    assert torch.equal(load_file(tmp_path / "model.safetensors")["3.cbp_factors"],
                       torch.tensor([-1.0, 0.0, 1.0]))
