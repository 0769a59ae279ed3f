"""Models: shapes, ResNet-20 structure, what cbp.prepare skips, weight files and their errors,
which published weights are fetched, and GoogLeNet rebuilt exactly from every kind of file."""

import os
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import cbp
from cbp import CBPConfig, prepare, select_layers
from cbp.files.checkpoint import save_checkpoint
from cbp.zoo.models import (
    ModelError,
    _read_weights,
    build_model,
    load_weights,
    model_options,
    rebuild_model,
    resnet20,
    torchvision_weights,
)

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


@pytest.mark.parametrize(("name", "stem"), [("resnet18", "conv1"), ("googlenet", "conv1.conv")])
def test_a_stem_rebuilt_for_other_input_keeps_torchvisions_geometry_and_init(name, stem):
    """A 4-channel stem: torchvision's 7x7 stride-2 padding-3 conv without bias, He-initialised
    for ReLU over its fan-out, std sqrt(2 / (64 * 7 * 7)) = 0.0253 (over its fan-in: 0.101)."""
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=4)
    conv = model.get_submodule(stem)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        4, 64, (7, 7), (2, 2), (3, 3))
    assert conv.bias is None
    assert abs(conv.weight.std().item() / (2 / (64 * 7 * 7)) ** 0.5 - 1) < 0.1
    if name == "googlenet":  # torchvision's own init elsewhere: truncated normal, std 0.01
        inner = model.inception3a.branch1.conv.weight
        assert abs(inner.std().item() / 0.01 - 1) < 0.1


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


def test_safetensors_files_are_read_without_torch_load(tmp_path, monkeypatch):
    """torch.load knows .safetensors files only in recent releases (cbp supports torch 2.1)."""
    save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")

    def old_torch_load(*args, **kwargs):
        raise RuntimeError("invalid load key")
    monkeypatch.setattr(torch, "load", old_torch_load)
    state, _ = _read_weights(str(tmp_path / "w.safetensors"))
    assert torch.equal(state["w"], torch.arange(3.0))


def test_weights_that_do_not_fit_are_refused_naming_the_file_and_the_first_key(tmp_path):
    state = resnet20(num_classes=10, in_channels=1).state_dict()
    path = str(tmp_path / "w.pt")
    torch.save(state, path)
    with pytest.raises(ModelError) as info:  # 10 classes saved, 5 built: fc.weight and fc.bias
        build_model("resnet20", 5, in_channels=1, weights=path)
    assert str(info.value) == (f"weights {path} do not fit the model: "
                               "2 shape mismatches (first: fc.weight)")
    del state["fc.bias"]
    torch.save(state, tmp_path / "short.pt")  # a key missing, nothing else wrong
    with pytest.raises(ModelError, match=r"short.pt do not fit the model: 1 missing keys "
                                         r"\(first: fc.bias\)$"):
        load_weights(resnet20(num_classes=10, in_channels=1), str(tmp_path / "short.pt"))
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match="1 missing keys .first: fc.bias.; 1 unexpected keys"):
        build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / "partial.pt"))


def test_load_weights_fills_a_model_built_elsewhere(tmp_path):
    torch.manual_seed(1)
    source = resnet20(num_classes=10, in_channels=1)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": source.state_dict(), "meta": {"model": "resnet20"}}, path)
    target = resnet20(num_classes=10, in_channels=1)
    assert load_weights(target, path) is target
    _assert_same_state(source, target)


def test_a_file_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """A state_dict whose tensors were saved from "cuda:0" (the tag torch writes for each
    storage, faked here) is read onto the CPU, whether or not this machine has a GPU."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"w": torch.ones(3)}, tmp_path / "gpu.pt")
    state, meta = _read_weights(str(tmp_path / "gpu.pt"))
    assert state["w"].device == torch.device("cpu") and torch.equal(state["w"], torch.ones(3))
    assert meta == {}


def test_unreadable_weights(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"fc.weight": torch.zeros(1), "step": 3}, tmp_path / "not_all_tensors.pt")
    torch.save({1: torch.zeros(1)}, tmp_path / "int_keys.pt")
    for file, message in (("junk.safetensors", "cannot read"), ("junk.pt", "cannot read"),
                          ("list.pt", "no state_dict"), ("missing.pt", "not found"),
                          ("not_all_tensors.pt", "no state_dict"), ("int_keys.pt", "no state_dict")):
        with pytest.raises(ModelError, match=message) as info:
            build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / file))
        assert "\n" not in str(info.value)
    # the reason is the reader's own first line; an error without a message gives its type
    with pytest.raises(Exception) as raised:
        load_file(str(tmp_path / "junk.safetensors"))  # safetensors, not unpickling, reads it
    for file, reason in (("junk.safetensors", str(raised.value).strip().splitlines()[0]),
                         ("empty.pt", "EOFError")):  # torch.load raises EOFError()
        with pytest.raises(ModelError) as info:
            build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / file))
        assert str(info.value) == f"cannot read weights {tmp_path / file}: {reason}"


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution a weights file must not do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = str(tmp_path / "marker")
    pickle.loads(pickle.dumps(_WritesMarker(marker))).close()  # the payload is live...
    assert os.path.exists(marker)
    os.remove(marker)
    state = resnet20(in_channels=1).state_dict()
    torch.save({"model": state, "payload": _WritesMarker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="cannot read weights"):
        build_model("resnet20", 10, in_channels=1, weights=str(tmp_path / "evil.pt"))
    # torch.load unpickles anything when this is set, unless weights_only is passed explicitly
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
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


# -- published weights: which file would be fetched (the download itself is mocked) -------------

# The original ImageNet weights (torchvision's file names and top-1, from its documentation):
# the paper's full-precision starting points. ResNet-50's torchvision DEFAULT is V2 (80.858%).
V1_FILES = {"resnet18": ("resnet18-f37072fd.pth", 69.758),
            "resnet50": ("resnet50-0676ba61.pth", 76.13),
            "googlenet": ("googlenet-1378be20.pth", 69.778)}


@pytest.fixture
def fake_download(monkeypatch):
    """Replace torchvision's download by a random state_dict of the architecture asked for.

    Returns the list of URLs requested and the state_dicts handed out, in order.
    """
    import torchvision.models as tvm
    import torchvision.models._api as api

    fetched, handed = [], []

    def load_state_dict_from_url(url, *args, **kwargs):
        name = url.rsplit("/", 1)[-1].split("-")[0]
        extra = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
        torch.manual_seed(len(fetched))
        state = tvm.get_model(name, weights=None, **extra).state_dict()
        fetched.append(url)
        handed.append(state)
        return state
    monkeypatch.setattr(api, "load_state_dict_from_url", load_state_dict_from_url)
    return fetched, handed


@pytest.mark.parametrize("name", sorted(V1_FILES))
def test_torchvision_weights_are_the_papers(name, fake_download):
    fetched, handed = fake_download
    file, top1 = V1_FILES[name]
    weights = torchvision_weights(name)
    assert (weights.name, weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]) == ("IMAGENET1K_V1",
                                                                                 top1)
    model = build_model(name, 1000, 3, weights="torchvision")
    assert [url.rsplit("/", 1)[-1] for url in fetched] == [file]
    loaded = model.state_dict()  # what was "downloaded" is what the model holds
    assert all(torch.equal(loaded[k], handed[0][k]) for k in loaded)
    if name == "googlenet":  # auxiliary heads dropped, input scaling of the published weights
        assert model.aux1 is None and model.transform_input is True
        assert not any(k.startswith("aux") for k in loaded)
        # unless the options say otherwise
        assert not build_model(name, 1000, 3, weights="torchvision",
                               transform_input=False).transform_input


def test_other_torchvision_weights_only_when_asked(fake_download):
    fetched, _ = fake_download
    build_model("resnet50", 1000, 3, weights="torchvision:IMAGENET1K_V2")
    build_model("resnet50", 1000, 3, weights="torchvision:DEFAULT")
    build_model("resnet50", 1000, 3, weights="torchvision:IMAGENET1K_V1")
    assert [url.rsplit("/", 1)[-1] for url in fetched] == [
        "resnet50-11ad3fa6.pth", "resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"]
    with pytest.raises(ModelError, match="no resnet50 weights 'V3'.*torchvision:IMAGENET1K_V1, "
                                         "torchvision:IMAGENET1K_V2"):
        build_model("resnet50", 1000, 3, weights="torchvision:V3")
    with pytest.raises(ModelError, match="no resnet50 weights 'IMAGENET1K_V1:V2'"):  # one member
        torchvision_weights("resnet50", "torchvision:IMAGENET1K_V1:V2")
    with pytest.raises(ModelError, match="no weights for alexnet_bn"):
        build_model("alexnet_bn", 1000, 3, weights="torchvision:IMAGENET1K_V1")
    assert fetched[3:] == []


def test_paper_configs_pin_the_original_weights(fake_download):
    """Every packaged paper config of a torchvision model starts from the V1 file."""
    from cbp.cli.commands import parse_args

    fetched, _ = fake_download
    for name in sorted(V1_FILES):
        for constraint in ("binary", "ternary", "shift1", "shift2"):
            args = parse_args(["quantize", "--config", f"paper/{name}-{constraint}", "--out", "x"])
            assert torchvision_weights(args.model, args.weights).url.endswith(V1_FILES[name][0])
    assert fetched == []  # resolving the weights downloads nothing


# -- GoogLeNet's transform_input survives every rebuild ------------------------------------------

GOOGLENET_INPUT = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model.eval()(GOOGLENET_INPUT)


def _with_batch_statistics(model):
    """BatchNorm running statistics of one batch: at their defaults, a freshly initialised
    GoogLeNet gives nearly the same logits for every input, whatever its input scaling."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    for bn in batchnorms:
        bn.momentum = 0.1
    return model


def _googlenet_checkpoint(path, model, mode="pretrain", **meta_extra):
    """A checkpoint as `cbp pretrain`/`cbp quantize` writes it (the keys rebuilding reads)."""
    meta = {"mode": mode, "dataset": "imagefolder", "num_classes": model.fc.out_features,
            "in_channels": 3, "input_size": [3, 64, 64], "model": "googlenet",
            "model_options": model_options(model), **meta_extra}
    save_checkpoint({"meta": meta, "model": model.state_dict(), "epoch": 1}, str(path))
    return str(path)


@pytest.mark.parametrize("transform_input", [True, False])
def test_googlenet_rebuilt_exactly_from_a_checkpoint(transform_input, tmp_path):
    from cbp.training.runs import load_model, load_pretrained

    torch.manual_seed(0)
    source = _with_batch_statistics(build_model("googlenet", 10, 3,
                                                transform_input=transform_input))
    want = _logits(source)
    wrong = build_model("googlenet", 10, 3, transform_input=not transform_input)
    wrong.load_state_dict(source.state_dict())
    assert (_logits(wrong) - want).norm() > 0.5 * want.norm()  # the flag matters
    path = _googlenet_checkpoint(tmp_path / "fp.pt", source)
    # cbp evaluate / export (--onnx) / summary
    model, _ = load_model(path)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    # cbp quantize --from
    model, _ = load_pretrained(path, 10, 3)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    # --weights FILE with the checkpoint (its recorded options are used)
    model = build_model("googlenet", 10, 3, weights=path)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    # a CBP checkpoint: rebuilt, prepared, loaded
    config = CBPConfig(include=[r"^inception3a\."])
    prepare(source, config)
    want = _logits(source)
    path = _googlenet_checkpoint(tmp_path / "cbp.pt", source, mode="quantize",
                                 factors=list(config.factors), include=config.include,
                                 exclude=[], skip_first_last=True)
    model, _ = load_model(path)
    assert model.transform_input is transform_input
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_googlenet_from_torchvisions_weights_file(tmp_path):
    """torchvision's published file: auxiliary heads inside, input scaling implied."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    published = _with_batch_statistics(tvm.get_model(
        "googlenet", weights=None, aux_logits=True, init_weights=True, transform_input=True))
    torch.save(published.state_dict(), tmp_path / "googlenet-1378be20.pth")
    model = build_model("googlenet", 1000, 3, weights=str(tmp_path / "googlenet-1378be20.pth"))
    assert model.aux1 is None
    torch.testing.assert_close(_logits(model), _logits(published), rtol=0, atol=0)
    assert model_options(build_model("googlenet", 10, 1)) == {"transform_input": False}  # grey
    assert model_options(build_model("resnet20", 10, 1)) == {}
    with pytest.raises(ModelError, match="resnet20 has no option transform_input"):
        build_model("resnet20", 10, 1, transform_input=True)
    with pytest.raises(ModelError, match="transform_input needs RGB input, not 1-channel input"):
        build_model("googlenet", 10, 1, transform_input=True)


def test_rebuild_model_passes_recorded_options_and_defaults_without_them():
    meta = {"model": "googlenet", "num_classes": 10, "in_channels": 3}
    assert rebuild_model(meta).transform_input is True   # a checkpoint from before the options
    assert rebuild_model({**meta, "model_options": {"transform_input": False}}).transform_input is False


def test_weights_from_a_checkpoint_written_before_model_options_were_recorded(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet20", 10, 1)
    meta = {"mode": "pretrain", "dataset": "fashion_mnist", "num_classes": 10, "in_channels": 1,
            "input_size": [1, 28, 28], "model": "resnet20"}   # no "model_options"
    save_checkpoint({"meta": meta, "model": source.state_dict(), "epoch": 1}, str(tmp_path / "old.pt"))
    loaded = build_model("resnet20", 10, 1, weights=str(tmp_path / "old.pt"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_build_model_takes_rgb_input_unless_told():
    assert build_model("resnet18", 10).conv1.in_channels == 3
    assert build_model("resnet18", 10, 1).conv1.in_channels == 1


def test_every_model_name_has_one_builder():
    from cbp.zoo import models

    assert set(models.MODEL_NAMES) == set(models._TORCHVISION) | set(models._BUILDERS)
    assert not set(models._TORCHVISION) & set(models._BUILDERS)
