"""Tied weights: written once in an export and tied again on load; a quantized layer tied to a
float layer converted, exported and sent to ONNX as the model was trained."""

import os

import pytest
import torch
from safetensors.torch import load as st_load
from test_export import FIXTURES, assert_export_error, read_meta, resave

import cbp
from cbp.files.export import export
from cbp.files.export_read import load_packed, read_packed
from cbp.files.summary import summary
from cbp.files.ties import share_as_stored, tied_keys
from cbp.zoo.gpt import CBP_SELECTION, GPT, GPTConfig

TINY = GPTConfig(vocab_size=11, context=16, layers=2, heads=2, width=16)
X = torch.arange(12).remainder(11)[None]   # the input the fixtures' logits were computed on
HEAD_QUANTIZED = {"skip_first_last": False}   # every Linear, the tied lm_head too


def tiny_gpt(selection=None) -> GPT:
    torch.manual_seed(0)
    model = GPT(TINY)
    return model if selection is None else cbp.prepare(model, cbp.CBPConfig("ternary", **selection))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def test_tied_keys_name_each_later_holder_of_a_parameter():
    assert tied_keys(tiny_gpt()) == {"lm_head.weight": "wte.weight"}
    assert tied_keys(torch.nn.Sequential(torch.nn.Linear(2, 2))) == {}


def test_a_tied_weight_is_written_once_and_loads_tied(tmp_path):
    model = tiny_gpt(CBP_SELECTION)
    path = export(model, tmp_path / "m.safetensors")
    meta, layout = read_meta(path.read_bytes())
    assert meta["version"] == 4
    assert {"key": "lm_head.weight", "tied": "wte.weight"} in layout
    assert [e["key"] for e in layout] == list(model.state_dict())
    # the payload is smaller than the one version 3 wrote by exactly the second copy (11 x 16 x 4)
    v3 = open(os.path.join(FIXTURES, "export_v3_gpt_tied.safetensors"), "rb").read()
    payload = sum(t.nbytes for t in st_load(path.read_bytes()).values())
    assert sum(t.nbytes for t in st_load(v3).values()) - payload == 11 * 16 * 4
    assert payload == summary(model).packed_bytes
    state = read_packed(path)
    assert state["lm_head.weight"] is state["wte.weight"]
    plain = load_packed(path, lambda: GPT(TINY))
    assert plain.lm_head.weight is plain.wte.weight
    assert torch.equal(logits(plain), logits(model))


def test_an_untied_model_is_tied_on_load_as_the_file_says(tmp_path):
    path = export(tiny_gpt(CBP_SELECTION), tmp_path / "m.safetensors")
    untied = GPT(TINY)
    untied.lm_head.weight = torch.nn.Parameter(untied.wte.weight.detach().clone())
    assert load_packed(path, untied).lm_head.weight is untied.wte.weight


def test_a_quantized_head_tied_to_a_float_embedding_converts_exports_and_loads_as_trained(tmp_path):
    """Training used the latent weight in the embedding and its levels in the head: the converted
    and the exported model keep both (the shared tensor snapped for both changes the logits)."""
    model = tiny_gpt(HEAD_QUANTIZED)
    assert "lm_head" in cbp.quantized_layers(model) and model.lm_head.weight is model.wte.weight
    latent, snapped = model.wte.weight.detach().clone(), model.lm_head.quantized_weight().detach()
    assert not torch.equal(latent, snapped)
    plain = cbp.convert(model)
    assert torch.equal(plain.wte.weight, latent) and torch.equal(plain.lm_head.weight, snapped)
    assert torch.equal(logits(plain), logits(model))
    assert model.lm_head.weight is model.wte.weight and torch.equal(model.wte.weight, latent)
    path = export(model, tmp_path / "m.safetensors")
    assert not any("tied" in e for e in read_meta(path.read_bytes())[1])   # two different tensors
    loaded = load_packed(path, lambda: GPT(TINY))
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.wte.weight, latent) and torch.equal(loaded.lm_head.weight, snapped)
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(logits(load_packed(path, tiny_gpt(HEAD_QUANTIZED))), logits(model))


def test_convert_keeps_a_frozen_quantized_head_tied_to_a_float_embedding_frozen():
    """The head's own snapped copy takes the tied weight's ``requires_grad``: fine-tuning the
    converted model leaves a frozen head as frozen as the embedding."""
    model = tiny_gpt(HEAD_QUANTIZED)
    model.wte.weight.requires_grad_(False)   # the head too: one Parameter
    plain = cbp.convert(model)
    assert plain.lm_head.weight is not plain.wte.weight
    assert not plain.lm_head.weight.requires_grad and not plain.wte.weight.requires_grad


def test_two_quantized_layers_tied_to_each_other_and_a_float_one_keep_their_tie():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    net[2].weight = net[3].weight = net[0].weight
    cbp.prepare(net, cbp.CBPConfig("binary", skip_first_last=False, exclude=(r"^0$",)))
    plain = cbp.convert(net)
    assert plain[2].weight is plain[3].weight is not plain[0].weight
    x = torch.randn(3, 4)
    assert torch.equal(plain(x), net(x))


def test_quantized_layers_tied_to_each_other_load_tied(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    net[2].weight = net[0].weight
    cbp.prepare(net, cbp.CBPConfig("ternary", skip_first_last=False))
    path = export(net, tmp_path / "m.safetensors")
    assert not any("tied" in e for e in read_meta(path.read_bytes())[1])   # packed twice
    table = summary(net)
    assert [(r.name, r.bits) for r in table.rows] == [("0", 46 / 29), ("2", 46 / 29)]
    assert table.packed_bytes == sum(t.nbytes for t in st_load(path.read_bytes()).values())
    def tied_net():
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        net[2].weight = net[0].weight
        return net
    plain = load_packed(path, tied_net)   # equal values: the model's tie is kept
    assert plain[2].weight is plain[0].weight
    x = torch.randn(3, 8)
    assert torch.equal(plain(x), net(x))


@pytest.mark.parametrize("name", ["tied", "head_quantized"])
def test_version_3_files_of_a_tied_model_still_load(name):
    """``fixtures/export_v3_gpt_*`` were written by main at 97f0691 (format version 3: the tied
    weight written twice; with the head quantized, its levels and the float embedding) from
    ``tiny_gpt`` prepared ternary, next to the prepared model's logits on ``X`` (``*_expected``).
    The head-quantized file used to load with the embedding snapped too. The weights must come
    back exactly; the logits up to float rounding, which differs between CPUs (the file was
    written on another machine's kernels)."""
    path = os.path.join(FIXTURES, f"export_v3_gpt_{name}.safetensors")
    assert read_meta(open(path, "rb").read())[0]["version"] == 3
    expected = st_load(open(path.replace(".safetensors", "_expected.safetensors"), "rb").read())
    model = load_packed(path, lambda: GPT(TINY))
    assert (model.lm_head.weight is model.wte.weight) == (name == "tied")
    for key in ("wte.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[key], expected[key]), key
    torch.testing.assert_close(logits(model), expected["logits"], rtol=1e-5, atol=1e-6)


def test_a_tie_to_a_key_the_file_does_not_hold_is_refused(tmp_path):
    path = export(tiny_gpt(CBP_SELECTION), tmp_path / "m.safetensors")
    data = path.read_bytes()

    def tie_to(target):
        def edit(layout):
            next(e for e in layout if "tied" in e)["tied"] = target
        return edit
    for target in ("lm_head.weight", "blocks.0.attn.qkv.cbp_scale", "nowhere"):
        resave(path, data, edit_layout=tie_to(target))
        assert_export_error(path, f"'lm_head.weight' is tied to '{target}', which the file does not "
                                  "hold before it$", builder=lambda: GPT(TINY))
    resave(path, data, edit_meta=lambda meta: meta.update(version=3))  # no ties before version 4
    assert_export_error(path, "corrupted cbp metadata for 'lm_head.weight'", builder=lambda: GPT(TINY))


def test_share_as_stored_leaves_untied_parameters_alone():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    before = list(model.parameters())
    share_as_stored(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert all(a is b for a, b in zip(before, model.parameters(), strict=True))


def test_share_as_stored_ties_and_unties_nested_parameters_as_the_file_does():
    """Keys below the top level (``1.0.weight``) are set on their own submodule; the Parameter a
    tied key gets when the file holds other values for it keeps the tie's requires_grad."""
    def nested():
        return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)),
                                   torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)))
    one = torch.ones(2, 2)
    untied = nested()
    share_as_stored(untied, {"0.0.weight": one, "1.0.weight": one})   # stored once: tied
    assert untied[1][0].weight is untied[0][0].weight
    tied = nested()
    tied[1][0].weight = tied[0][0].weight.requires_grad_(False)        # a frozen tie
    share_as_stored(tied, {"0.0.weight": one, "1.0.weight": one.clone()})   # equal: kept
    assert tied[1][0].weight is tied[0][0].weight
    share_as_stored(tied, {"0.0.weight": one, "1.0.weight": 2 * one})   # different: one each
    first, second = tied[0][0].weight, tied[1][0].weight
    assert second is not first and type(second) is torch.nn.Parameter
    assert not first.requires_grad and not second.requires_grad
    assert [k for k, _ in tied.named_parameters()] == ["0.0.weight", "1.0.weight"]


def test_onnx_of_a_quantized_head_tied_to_a_float_embedding_computes_the_trained_model(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cbp.files.onnx_export import check_onnx, export_onnx
    model = tiny_gpt(HEAD_QUANTIZED)
    path = export_onnx(model, tmp_path / "m.onnx", X)
    assert check_onnx(path, model, X.repeat(3, 1)) <= 1e-5
