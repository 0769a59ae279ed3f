"""Packed export: bit packing, round trips to a plain model, sizes, summary, errors, ONNX."""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import cbp
from cbp.export import ExportError, export, load_packed
from cbp.onnx_export import MissingDependencyError, check_onnx, export_onnx
from cbp.packing import pack_indices, packed_nbytes, unpack_indices
from cbp.summary import summary

CUSTOM = (-1.0, -0.3, 0.0, 0.6, 1.5)
LEVELS = {"binary": 1, "ternary": 2, "shift1": 3, "shift2": 3, CUSTOM: 3}  # -> bits per weight


# -- packing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_round_trip(bits, count):
    indices = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_indices(packed, bits, count), indices)


def test_pack_bit_order_by_hand():
    # 1,2,3,4,5 in 3 bits, LSB first: 100 010 110 001 10|1 -> bytes 0b11010001, 0b01011000.
    assert pack_indices(torch.tensor([1, 2, 3, 4, 5]), 3).tolist() == [209, 88]
    bits = torch.randint(0, 2, (29,))
    expected = np.packbits(bits.numpy().astype(np.uint8), bitorder="little")
    assert pack_indices(bits, 1).tolist() == expected.tolist()
    assert pack_indices(torch.tensor([[7, 200], [0, 255]], dtype=torch.uint8), 8).tolist() == [
        7, 200, 0, 255]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_indices(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_indices(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_indices(torch.tensor([0.5]), 2)
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 3, 5)
    for bits in (0, -1, 2.0):
        with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
            pack_indices(torch.tensor([0]), bits)
        with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
            unpack_indices(torch.zeros(1, dtype=torch.uint8), bits, 1)
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        pack_indices(torch.tensor([0, -1, 1]), 2)
    with pytest.raises(ValueError, match="integer tensor, got torch.bool"):
        pack_indices(torch.tensor([True]), 1)
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="1-D uint8"):
            unpack_indices(bad, 8, 2)


# -- round trip ------------------------------------------------------------------------------------

def small_net() -> nn.Module:
    """Four convs and a Linear; prepare quantizes the three in the middle (one with a bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def prepared_net(levels="binary") -> nn.Module:
    model = small_net()
    model(torch.randn(16, 3, 8, 8))  # non-trivial BatchNorm running stats
    return cbp.prepare(model, cbp.CBPConfig(levels=levels)).eval()


def split(data: bytes) -> int:
    """The header length of safetensors bytes: the payload starts at ``8 + split(data)``."""
    return int.from_bytes(data[:8], "little")


def header_size(path) -> int:
    with open(path, "rb") as f:
        return split(f.read(8))


@pytest.mark.parametrize("levels", list(LEVELS), ids=str)
def test_load_packed_predicts_exactly_like_the_prepared_model(tmp_path, levels):
    model = prepared_net(levels)
    path = export(model, tmp_path / "m.safetensors")
    plain = load_packed(path, small_net)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        expected, got = model(x), plain(x)
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert not plain.training and not cbp.quantized_layers(plain)
    for name, layer in cbp.quantized_layers(model).items():
        weight = plain.get_submodule(name).weight
        assert torch.equal(weight, cbp.quantize(layer.weight, layer.levels))
        assert len(weight.unique()) <= len(cbp.resolve_factors(levels))
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "13.bias", "0.weight"):
        assert torch.equal(plain.state_dict()[key], model.state_dict()[key])
    meta, layout = read_meta(path.read_bytes())
    assert (meta["format"], meta["version"]) == ("cbp-packed", 2)
    assert [e["key"] for e in layout] == list(model.state_dict())
    bits = {e["bits"] for e in layout if "bits" in e}
    assert bits == {LEVELS[levels]}
    assert set(st_load(path.read_bytes())) == {"packed", "float32", "int64"}


def test_load_packed_fills_a_given_model(tmp_path):
    model = prepared_net("ternary")
    path = export(model, tmp_path / "m.safetensors")
    target = prepared_net("binary")  # a prepared model is converted first
    assert load_packed(path, target) is target
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))


def test_resnet20_round_trip_and_size(tmp_path):
    models = pytest.importorskip("cbp.models")
    model = models.resnet20()
    model(torch.randn(8, 1, 28, 28))
    cbp.prepare(model, cbp.CBPConfig(levels="binary")).eval()
    path = export(model, tmp_path / "r20.safetensors")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(path, models.resnet20)(x), model(x))
    float_file = len(st_save(cbp.convert(model).state_dict()))
    assert os.path.getsize(path) < float_file / 15  # measured: 16.8x smaller


# -- sizes and summary -----------------------------------------------------------------------------

def test_file_size_is_close_to_ideal(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.Linear(512, 512), nn.Linear(512, 512),
                          nn.Linear(512, 511), nn.Linear(511, 4))
    cbp.prepare(model, cbp.CBPConfig(levels="ternary"))
    path = export(model, tmp_path / "m.safetensors")
    quantized = cbp.quantized_layers(model)
    packed = sum(packed_nbytes(m.weight.numel(), 2) for m in quantized.values())
    floats = sum(t.nbytes for k, t in model.state_dict().items()
                 if k.rpartition(".")[0] not in quantized or not k.endswith("weight"))
    size = os.path.getsize(path)
    assert packed > 3 * floats
    assert packed + floats < size < 1.1 * (packed + floats)
    assert size == 8 + header_size(path) + summary(model).packed_bytes


def test_summary_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Linear(3, 2))
    cbp.prepare(model, cbp.CBPConfig(levels="shift1"))
    result = summary(model)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["0", "1", "2", "3"]
    assert rows["2"].kind == "QuantLinear" and rows["2"].params == 15 and rows["2"].bits == 3
    # float: 12 weights + 3 biases; packed: ceil(36 bits / 8) + 3 biases + 5 factors + 1 scale.
    assert (rows["2"].float_bytes, rows["2"].packed_bytes) == (60, 5 + 12 + 20 + 4)
    # BatchNorm: weight, bias, running mean and var (float32), num_batches_tracked (int64).
    assert (rows["1"].params, rows["1"].bits, rows["1"].float_bytes) == (8, 32, 4 * 16 + 8)
    assert rows["1"].packed_bytes == rows["1"].float_bytes
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.float_bytes == sum(t.nbytes for t in cbp.convert(model).state_dict().values())
    text = str(result)
    assert "QuantLinear" in text and "total" in text and f"{result.ratio:.1f}x" in text


def test_summary_of_plain_model_is_all_float():
    result = summary(small_net())
    assert all(r.bits == 32 and r.packed_bytes == r.float_bytes for r in result.rows)
    assert result.ratio == 1.0


@pytest.mark.parametrize("levels", ["binary", CUSTOM], ids=str)
def test_summary_matches_export_payload(tmp_path, levels):
    model = prepared_net(levels)
    path = export(model, tmp_path / "m.safetensors")
    payload = os.path.getsize(path) - 8 - header_size(path)
    assert summary(model).packed_bytes == payload


# -- errors ----------------------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    path = export(prepared_net(CUSTOM), tmp_path / "m.safetensors")
    return path, path.read_bytes()


def assert_export_error(path, match=None, builder=small_net):
    with pytest.raises(ExportError, match=match) as info:
        load_packed(path, builder)
    assert "\n" not in str(info.value)


def test_files_that_are_not_ours(tmp_path):
    cases = {"empty": b"", "text": b"hello, this is not a model\n" * 4,
             "plain": st_save(small_net().state_dict()),
             "other": st_save({"x": torch.zeros(2)}, metadata={"format": "pt"})}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save(small_net().state_dict(), tmp_path / "pickle")
    for name in ["empty", "text", "pickle"]:
        assert_export_error(tmp_path / name, "not a")
    for name in ["plain", "other"]:
        assert_export_error(tmp_path / name, "without cbp metadata")
    assert_export_error(tmp_path / "missing", "cannot read")


def test_truncated_file(tmp_path, exported):
    path, data = exported
    for cut in [3, 8 + header_size(path) // 2, 8 + header_size(path) + 10, len(data) - 1]:
        path.write_bytes(data[:cut])
        assert_export_error(path, "truncated|not a")


def test_every_flipped_header_byte_is_caught(tmp_path, exported):
    path, data = exported
    for i in range(8 + header_size(path)):  # the length prefix too
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
        assert_export_error(path)


def test_flipped_payload_byte_is_caught(tmp_path, exported):
    path, data = exported
    for i in range(8 + header_size(path), len(data), 97):
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
        assert_export_error(path, "CRC-32")


def read_meta(data: bytes) -> tuple[dict, list[dict]]:
    """Our metadata and its layout list, decoded as the module docstring describes the format."""
    meta = json.loads(json.loads(data[8 : 8 + split(data)])["__metadata__"]["cbp"])
    return meta, json.loads(zlib.decompress(base64.b64decode(meta["layout"])))


def resave(path, data, edit_tensors=None, edit_layout=None, edit_meta=None):
    """Rewrite an export with edited tensors or layout, keeping a valid CRC (a deliberate forgery)."""
    tensors = st_load(data)
    meta, layout = read_meta(data)
    for edit, target in ((edit_tensors, tensors), (edit_layout, layout), (edit_meta, meta)):
        if edit:
            edit(target)
    payload = st_save(tensors)
    meta["crc32"] = zlib.crc32(payload[8 + split(payload) :])
    if not edit_meta:
        meta["layout"] = base64.b64encode(zlib.compress(json.dumps(layout).encode())).decode()
    path.write_bytes(st_save(tensors, metadata={"cbp": json.dumps(meta)}))


def entry(layout, key):
    return next(e for e in layout if e["key"] == key)


def test_inconsistent_contents(tmp_path, exported):
    path, data = exported
    packed_bytes = len(st_load(data)["packed"])
    resave(path, data, edit_tensors=lambda t: t.update(packed=t["packed"][:-1]))
    assert_export_error(path, f"tensor 'packed' ends inside '9.weight' .{packed_bytes - 1} "
                              f"entries, '9.weight' needs {packed_bytes}")
    resave(path, data, edit_tensors=lambda t: t.update(packed=torch.cat([t["packed"], t["packed"][:1]])))
    assert_export_error(path, "tensor 'packed' holds 1 entries that no layer uses")
    resave(path, data, edit_tensors=lambda t: t["packed"].fill_(255))  # index 7 of 5 levels
    assert_export_error(path, "level index 7 of 5")
    resave(path, data, edit_tensors=lambda t: t.update(float32=t["float32"].double()))
    assert_export_error(path, "tensor 'float32' holding '0.weight' is missing or malformed")
    resave(path, data, edit_layout=lambda layout: layout.remove(entry(layout, "6.cbp_scale")),
           edit_tensors=lambda t: t.update(float32=t["float32"][:-1]))   # sizes still add up
    assert_export_error(path, "'6.cbp_scale' is missing")
    resave(path, data, edit_layout=lambda layout: entry(layout, "3.weight").update(bits=2))
    assert_export_error(path, "corrupted cbp metadata for '3.weight'")
    resave(path, data, edit_meta=lambda meta: meta.update(layout="bm90IHpsaWI="))  # "not zlib"
    assert_export_error(path, "corrupted cbp metadata .layout: error")
    resave(path, data, edit_meta=lambda meta: meta.update(version=1))
    assert_export_error(path, "version 1 is not supported")


@pytest.mark.parametrize("change", [
    {"n_levels": 257, "bits": 9}, {"n_levels": 1, "bits": 1}, {"n_levels": 5.0},
    {"bits": 4}, {"dtype": "int32"}, {"dtype": "tensor"}, {"shape": [-1, 4]}, {"shape": [2.5]},
    {"key": 3}])
def test_layout_entries_are_type_checked(tmp_path, exported, change):
    """A layout entry that could not have been written: refused by name, before any unpacking."""
    path, data = exported
    resave(path, data, edit_layout=lambda layout: entry(layout, "3.weight").update(change))
    assert_export_error(path, "corrupted cbp metadata for ")


def test_model_that_does_not_fit(exported):
    path, _ = exported
    assert_export_error(path, r"0.weight has shape \(8, 3, 3, 3\) in the file, \(8, 1, 3, 3\)",
                        builder=lambda: nn.Sequential(nn.Conv2d(1, 8, 3), *list(small_net())[1:]))
    assert_export_error(path, "missing 14.bias", builder=lambda: nn.Sequential(
        *small_net(), nn.Linear(10, 2)))
    assert_export_error(path, "unexpected 13.bias, 13.weight, 9.weight", builder=lambda: nn.Sequential(
        *list(small_net())[:9]))
    assert_export_error(path, "must return an nn.Module", builder=lambda: "resnet20")


def test_write_is_atomic(tmp_path, exported, monkeypatch):
    path, data = exported

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(ExportError, match="cannot write \\(disk full\\)"):
        export(prepared_net("binary"), path)
    assert path.read_bytes() == data and os.listdir(tmp_path) == [path.name]
    with pytest.raises(ExportError, match="cannot write"):
        export(prepared_net("binary"), tmp_path / "no" / "such" / "dir.safetensors")


# -- ONNX ------------------------------------------------------------------------------------------

def test_onnx_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = prepared_net("shift2")
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert check_onnx(path, model, torch.randn(5, 3, 8, 8)) <= 1e-5  # dynamic batch dimension
    assert cbp.quantized_layers(model)  # the prepared model is left as it was


def test_onnx_names_the_extra_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install cbp\[onnx\]") as info:
        export_onnx(prepared_net(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
