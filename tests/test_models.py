"""Models: shapes, ResNet-20 structure, what cbp.prepare skips, weight files and their errors."""

import os
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import cbp
from cbp import CBPConfig, select_layers
from cbp.models import ModelError, build_model, resnet20

# (name, input side): the smallest convenient size each architecture accepts
SIZES = {"resnet20": 28, "resnet18": 32, "resnet50": 32, "googlenet": 64, "alexnet_bn": 64}
STEM_AND_HEAD = {"resnet20": ("conv1", "fc"), "resnet18": ("conv1", "fc"),
                 "resnet50": ("conv1", "fc"), "googlenet": ("conv1.conv", "fc"),
                 "alexnet_bn": ("features.0", "classifier.6")}


def _weighted(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# one channel count per model; grey input covers the stem rebuilt on torchvision models
@pytest.mark.parametrize(("name", "in_channels"), [
    ("resnet20", 1), ("resnet18", 1), ("resnet50", 3), ("googlenet", 1), ("alexnet_bn", 3)])
def test_forward_shape_and_layer_order(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    side = SIZES[name]
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, side, side))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    layers = _weighted(model)
    assert (layers[0][0], layers[-1][0]) == STEM_AND_HEAD[name]
    assert layers[0][1].in_channels == in_channels
    chosen = select_layers(model, CBPConfig())
    assert len(chosen) == len(layers) - 2 and STEM_AND_HEAD[name][0] not in chosen


def test_resnet20_structure():
    model = resnet20(num_classes=10, in_channels=3)
    convs = [m for _, m in _weighted(model) if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19
    downsample = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in downsample] == [
        (16, 32, (2, 2)), (32, 64, (2, 2))]
    assert len(convs) == 21 and isinstance(_weighted(model)[-1][1], nn.Linear)
    assert any("downsample" in n for n in select_layers(model, CBPConfig()))
    # parameters counted by hand: conv weights, BN (gamma, beta) per channel, fc
    conv = 9 * (3 * 16 + 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64)
    conv += 16 * 32 + 32 * 64
    bn = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)
    fc = 64 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == conv + bn + fc
    assert resnet20(width=8)(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_alexnet_bn_structure():
    model = build_model("alexnet_bn", num_classes=5)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    kinds = [type(m).__name__ for m in model.classifier]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 5


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    source = resnet20(num_classes=10, in_channels=1)
    source(torch.randn(4, 1, 28, 28))  # move BN running statistics off their defaults
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pt")
    for file in ("w.safetensors", "w.pt", "ckpt.pt"):
        loaded = build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / file))
        _assert_same_state(source, loaded)


def test_mismatched_weights(tmp_path):
    state = resnet20(num_classes=10, in_channels=1).state_dict()
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelError, match="shape mismatches.*fc.weight"):
        build_model("resnet20", 5, in_channels=1, weights=str(tmp_path / "w.pt"))
    del state["fc.bias"]
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match="1 missing keys .first: fc.bias.; 1 unexpected keys"):
        build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / "partial.pt"))


def test_unreadable_weights(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for file, message in (("junk.safetensors", "cannot read"), ("junk.pt", "cannot read"),
                          ("list.pt", "no state_dict"), ("missing.pt", "not found")):
        with pytest.raises(ModelError, match=message) as info:
            build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / file))
        assert "\n" not in str(info.value)


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution a weights file must not do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = str(tmp_path / "marker")
    pickle.loads(pickle.dumps(_WritesMarker(marker))).close()  # the payload is live...
    assert os.path.exists(marker)
    os.remove(marker)
    state = resnet20(in_channels=1).state_dict()
    torch.save({"model": state, "payload": _WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / "evil.pt"))
    assert not os.path.exists(marker)  # ...but loading weights never ran it


def test_bad_names_and_unpublished_weights():
    with pytest.raises(ModelError, match="resnet20, resnet18, resnet50, googlenet, alexnet_bn"):
        build_model("vgg16", 10)
    for name in ("resnet20", "alexnet_bn"):
        with pytest.raises(ModelError, match="no weights"):
            build_model(name, 10, weights="torchvision")
    with pytest.raises(ModelError, match="1000 classes"):  # refused before any download
        build_model("resnet18", 10, weights="torchvision")


def test_tiny_mobilenetv2_quantizes_every_conv_but_the_stem_depthwise_ones_included():
    model = build_model("mobilenetv2_tiny", 10, in_channels=1)
    layers = cbp.quantized_layers(cbp.prepare(model, cbp.CBPConfig("binary")))
    depthwise = [n for n, m in layers.items() if m.groups > 1 and m.groups == m.in_channels]
    assert len(layers) == 24 and len(depthwise) == 8
    assert sum(m.weight.numel() for m in layers.values()) == 98832
    assert "stem.0" not in layers and "fc" not in layers
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
