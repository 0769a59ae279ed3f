"""prepare / convert: layer selection, the straight-through forward, plain-model conversion."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import cbp
from cbp.core.constraint import quantize
from cbp.files.export_read import read_packed


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
    by_module = cbp.CBPConfig(filter_fn=lambda m, name: m.kernel_size == (1, 1))   # the same three
    assert cbp.select_layers(model, by_module) == cbp.select_layers(model, only_downsample)
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


def test_convert_in_place_snaps_the_models_own_parameters():
    """``inplace=True`` keeps every Parameter object: an optimizer made before ``convert`` still
    fine-tunes the converted model (a fresh Parameter would be left out of it)."""
    model = cbp.prepare(small_net(), cbp.CBPConfig())
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = cbp.convert(model, inplace=True)
    assert plain is model
    assert all(p is before.pop(k) for k, p in plain.named_parameters()) and not before
    snapped = plain[3].weight.detach().clone()
    assert len(snapped.unique()) == 2   # binary: on its two levels
    F.cross_entropy(plain(torch.randn(4, 1, 9, 9)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert not torch.equal(plain[3].weight, snapped)


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


def test_levels_that_collapse_at_a_layers_scale_are_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.fill_(1e-30)      # scale 1e-30: levels of 1e-20 times it are 0 in float32
    with pytest.raises(ValueError, match="layer '1'.s levels .* collapse"):
        cbp.prepare(net, cbp.CBPConfig(levels=(-1e-20, 1e-20)))
    assert not cbp.quantized_layers(net)


@pytest.mark.parametrize("make_layer", [lambda: nn.Linear(6, 3), lambda: nn.Conv2d(2, 3, 3)],
                         ids=["linear", "conv"])
def test_prepare_quantizes_a_bare_layer_in_place(make_layer, tmp_path):
    torch.manual_seed(0)
    layer = make_layer()   # built per run: a layer made at collection would be prepared already
    x = torch.randn(4, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 2, 5, 5)
    q = cbp.prepare(layer, cbp.CBPConfig(skip_first_last=False))
    assert q is layer and isinstance(q, cbp.core.layers.QuantizedLayer)
    assert [name for name, _ in q.named_modules()] == [""]            # contains no module
    assert set(q.state_dict()) == {"weight", "bias", "cbp_factors", "cbp_scale"}
    a = layer.weight.abs().mean()
    w_q = torch.where(layer.weight > 0, a, -a)                       # binary by hand
    expected = (F.linear(x, w_q, layer.bias) if isinstance(layer, nn.Linear)
                else F.conv2d(x, w_q, layer.bias))
    torch.testing.assert_close(q(x), expected)
    cbp.export(q, tmp_path / "m.safetensors")
    torch.testing.assert_close(read_packed(tmp_path / "m.safetensors")["weight"], w_q)
    plain = cbp.convert(q)
    assert type(plain) in (nn.Linear, nn.Conv2d) and set(plain.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(plain(x), expected)
    assert isinstance(q, cbp.core.layers.QuantizedLayer)                   # convert copied


class _BertStyle(nn.Module):
    """The module names of a BERT-style encoder (``encoder.layer.N.attention.self.query``)."""

    def __init__(self, d=8, layers=2):
        super().__init__()
        self.embeddings = nn.Embedding(11, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.attention = nn.Module()
            block.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(block.attention.self, name, nn.Linear(d, d))
            block.attention.output = nn.Module()
            block.attention.output.dense = nn.Linear(d, d)
            block.intermediate, block.output = nn.Module(), nn.Module()
            block.intermediate.dense, block.output.dense = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.encoder.layer.append(block)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(d, d)


ENCODER_LINEARS = [f"encoder.layer.{i}.{m}" for i in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")]


README_RECIPE = {"skip_first_last": False, "include": [r"\.layers?\.\d+\."]}


def _bert_from_config() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16)
    return transformers.BertModel(config)


@pytest.mark.parametrize("build", [_BertStyle, _bert_from_config])
def test_the_readme_transformer_recipe_selects_every_encoder_linear(build):
    model = build()
    assert cbp.select_layers(model, cbp.CBPConfig(**README_RECIPE)) == ENCODER_LINEARS
    cbp.prepare(model, cbp.CBPConfig("ternary", **README_RECIPE))
    assert sorted(cbp.quantized_layers(model)) == sorted(ENCODER_LINEARS)


def test_no_layer_left_names_the_rules_that_are_on():
    config = cbp.CBPConfig(skip_first_last=False, include=[r"\.layers\.\d+\."])
    with pytest.raises(ValueError, match=r"none of the model's 13 Conv/Linear layers passes the "
                                         r"selection: include \[") as refused:
        cbp.prepare(_BertStyle(), config)
    assert "skip_first_last" not in str(refused.value)   # off: not blamed
    with pytest.raises(ValueError, match="skip_first_last .*--quantize-first-last"):
        cbp.prepare(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), cbp.CBPConfig())
    with pytest.raises(ValueError, match="no Conv1d/2d/3d or Linear layer"):
        cbp.prepare(nn.Sequential(nn.ReLU()), cbp.CBPConfig())


def test_an_empty_selection_names_the_rules_that_are_on():
    with pytest.raises(ValueError) as info:
        cbp.prepare(nn.Sequential(nn.ReLU()))
    assert str(info.value) == ("no layer left to quantize: the model has no Conv1d/2d/3d or "
                               "Linear layer")
    three = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    config = cbp.CBPConfig(filter_fn=lambda module, name: name != "1", include=["0", "1"],
                           exclude=["^1$"])
    with pytest.raises(ValueError) as info:
        cbp.prepare(three, config)
    assert str(info.value) == (
        "no layer left to quantize: none of the model's 3 Conv/Linear layers passes the "
        "selection: skip_first_last (the first and last are kept float; --quantize-first-last "
        "turns it off), filter_fn, include ['0', '1'], exclude ['^1$']")
    with pytest.raises(ValueError, match=r"passes the selection: include \['9'\]$"):
        cbp.prepare(three, cbp.CBPConfig(skip_first_last=False, include=["9"]))


def test_param_groups_decay_conv_and_linear_weights_and_skip_frozen_and_repeated_ones():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)                 # frozen: in no group, its bias still is
    decay, no_decay = cbp.param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["params"] == [model[2].weight]
    assert no_decay["params"] == [model[0].bias, model[1].weight, model[1].bias, model[2].bias]


def test_an_all_zero_bare_layer_is_refused_as_the_model_itself():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.zero_()
    with pytest.raises(ValueError, match=r"^layer the model itself has all-zero weights \(scale "
                                         r"mean\|W\| = 0\), so it cannot be quantized$"):
        cbp.prepare(layer, cbp.CBPConfig(skip_first_last=False))
