"""Packed export: round trips to a plain model, sizes, errors.

The pieces it is built from have their own files: test_packing.py, test_summary.py and
test_onnx_export.py.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import zlib

import pytest
import torch
import torch.nn as nn
from conftest import prepared_net, small_net, tiny_gpt
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import cbp
from cbp.files.export import ExportError, checksum, export
from cbp.files.export_read import load_packed
from cbp.files.packing import grouping
from cbp.files.summary import summary
from cbp.zoo.gpt import CBP_SELECTION

CUSTOM = (-1.0, -0.3, 0.0, 0.6, 1.5)
LEVELS = ["binary", "ternary", "shift1", "shift2", CUSTOM,
          *(tuple(torch.linspace(-1, 1, k).tolist()) for k in (6, 129, 256))]


# -- round trip ------------------------------------------------------------------------------------

def split(data: bytes) -> int:
    """The header length of safetensors bytes: the payload starts at ``8 + split(data)``."""
    return int.from_bytes(data[:8], "little")


def header_size(path) -> int:
    with open(path, "rb") as f:
        return split(f.read(8))


@pytest.mark.parametrize("levels", LEVELS, ids=lambda levels: f"{len(cbp.resolve_factors(levels))}")
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
    assert (meta["format"], meta["version"]) == ("cbp-packed", 4)
    assert [e["key"] for e in layout] == list(model.state_dict())
    k = len(cbp.resolve_factors(levels))
    groups = [(e["n_levels"], e["group"]) for e in layout if "group" in e]
    assert groups == [(k, [grouping(k).size, grouping(k).bits])] * 3
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
    models = pytest.importorskip("cbp.zoo.models")
    model = models.resnet20()
    model(torch.randn(8, 1, 28, 28))
    cbp.prepare(model, cbp.CBPConfig(levels="binary")).eval()
    path = export(model, tmp_path / "r20.safetensors")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(path, models.resnet20)(x), model(x))
    float_file = len(st_save(cbp.convert(model).state_dict()))
    assert os.path.getsize(path) < float_file / 15  # measured: 16.8x smaller


# -- sizes -----------------------------------------------------------------------------------------

def test_file_size_is_close_to_ideal(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.Linear(512, 512), nn.Linear(512, 512),
                          nn.Linear(512, 511), nn.Linear(511, 4))
    cbp.prepare(model, cbp.CBPConfig(levels="ternary"))
    path = export(model, tmp_path / "m.safetensors")
    quantized = cbp.quantized_layers(model)
    bound = sum(m.weight.numel() for m in quantized.values()) * math.log2(3) / 8  # information
    floats = sum(t.nbytes for k, t in model.state_dict().items()
                 if k.rpartition(".")[0] not in quantized or not k.endswith("weight"))
    size = os.path.getsize(path)
    payload = size - 8 - header_size(path)
    assert bound > 3 * floats
    assert bound + floats < payload <= 1.001 * (bound + floats)  # 1.6 bits per trit: 1.009
    assert payload == summary(model).packed_bytes


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


def assert_export_error(path, match=None, builder=small_net, names_file=True):
    with pytest.raises(ExportError, match=match) as info:
        load_packed(path, builder)
    assert "\n" not in str(info.value)
    if names_file:   # every fault in a file names that file first
        assert str(info.value).startswith(f"{path}: "), str(info.value)


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


def resave(path, data, edit_tensors=None, edit_layout=None, edit_meta=None, crc_of_payload=False):
    """Rewrite an export with edited tensors, layout or metadata and a CRC recomputed as export
    does (a deliberate forgery), or only over the tensor data as format version 2 did."""
    tensors = st_load(data)
    meta, layout = read_meta(data)
    for edit, target in ((edit_tensors, tensors), (edit_layout, layout), (edit_meta, meta)):
        if edit:
            edit(target)
    if not edit_meta:
        meta["layout"] = base64.b64encode(zlib.compress(json.dumps(layout).encode())).decode()
    del meta["crc32"]
    unsigned = st_save(tensors, metadata={"cbp": json.dumps(meta)})
    header, payload = json.loads(unsigned[8 : 8 + split(unsigned)]), unsigned[8 + split(unsigned) :]
    meta["crc32"] = zlib.crc32(payload) if crc_of_payload else checksum(header, payload)
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
    resave(path, data, edit_tensors=lambda t: t["packed"].fill_(255))  # groups of 24 in 56 bits
    assert_export_error(path, f"level index {(2**56 - 1) // 5**23} of 5")     # top digit: 6
    resave(path, data, edit_tensors=lambda t: t.update(float32=t["float32"].double()))
    assert_export_error(path, "tensor 'float32' holding '0.weight' is missing or malformed")
    resave(path, data, edit_layout=lambda layout: layout.remove(entry(layout, "6.cbp_scale")),
           edit_tensors=lambda t: t.update(float32=t["float32"][:-1]))   # sizes still add up
    assert_export_error(path, "'6.cbp_scale' is missing")
    resave(path, data, edit_layout=lambda layout: entry(layout, "3.weight").update(group=[24, 55]))
    assert_export_error(path, "corrupted cbp metadata for '3.weight'")
    resave(path, data, edit_meta=lambda meta: meta.update(layout="bm90IHpsaWI="))  # "not zlib"
    assert_export_error(path, "corrupted cbp metadata .layout: error")
    resave(path, data, edit_meta=lambda meta: meta.update(version=1))
    assert_export_error(path, "version 1 is not supported")


@pytest.mark.parametrize("change", [
    {"n_levels": 257, "bits": 9}, {"n_levels": 1, "bits": 1}, {"n_levels": 5.0},
    {"group": [24, 55]}, {"group": [0, 8]}, {"group": "24"},
    {"dtype": "int32"}, {"dtype": "tensor"}, {"shape": [-1, 4]}, {"shape": [2.5]},
    {"key": 3}])
def test_layout_entries_are_type_checked(tmp_path, exported, change):
    """A layout entry that could not have been written: refused by name, before any unpacking."""
    path, data = exported
    resave(path, data, edit_layout=lambda layout: entry(layout, "3.weight").update(change))
    assert_export_error(path, "corrupted cbp metadata for ")


def swap(first, second):
    """A layout edit: entries ``first`` and ``second`` trade places (and so their data)."""
    def edit(layout):
        i, j = layout.index(entry(layout, first)), layout.index(entry(layout, second))
        layout[i], layout[j] = layout[j], layout[i]
    return edit


def test_checksum_covers_layout_and_metadata(tmp_path, exported):
    path, data = exported
    original = cbp.read_packed(path)
    # BatchNorm weight and bias have the same shape: swapped, they would load scrambled ...
    resave(path, data, edit_layout=swap("1.weight", "1.bias"))
    scrambled = cbp.read_packed(path)
    assert torch.equal(scrambled["1.weight"], original["1.bias"])
    assert not torch.equal(scrambled["1.weight"], original["1.weight"])
    # ... but a file whose CRC covers only the tensor data, as in version 2, is refused.
    edits = {"swap": {"edit_layout": swap("1.weight", "1.bias")},
             "shape": {"edit_layout": lambda layout: entry(layout, "1.weight").update(shape=[2, 4])},
             "levels": {"edit_layout": lambda layout: entry(layout, "3.weight").update(
                 group=[23, 54])},
             "metadata": {"edit_meta": lambda meta: meta.update(note="edited")}}
    for edit in edits.values():
        resave(path, data, crc_of_payload=True, **edit)
        assert_export_error(path, "header or tensor data fails its CRC-32 check")


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 13), nn.BatchNorm1d(13), nn.Linear(13, 6),
                         nn.Linear(6, 3))


@pytest.mark.parametrize("levels", ["ternary", "shift1"])
def test_version_2_file_still_loads(levels):
    """``fixtures/export_v2_*`` were written by main at 78925a4 (format version 2, one
    ceil(log2 k)-bit field per index: 2 bits ternary, 3 bits shift1) from ``fixture_net`` prepared
    with these levels, next to its ``cbp.convert``-ed float state_dict (``*_expected``)."""
    path = os.path.join(FIXTURES, f"export_v2_{levels}.safetensors")
    data = open(path, "rb").read()
    meta, layout = read_meta(data)
    assert meta["version"] == 2 and "group" not in str(layout)
    assert {e["bits"] for e in layout if "bits" in e} == {2 if levels == "ternary" else 3}
    expected = st_load(open(path.replace(".safetensors", "_expected.safetensors"), "rb").read())
    model = load_packed(path, fixture_net)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert len(model[1].weight.unique()) <= len(cbp.resolve_factors(levels))


def test_version_3_file_still_loads(tmp_path):
    """``fixtures/export_v3_ternary*`` were written by main at db374db (format version 3, one
    scale per layer, before per-channel scales) from ``fixture_net`` (seed 0, BatchNorm run on
    one batch) prepared ternary, next to its ``cbp.convert``-ed float state_dict."""
    path = os.path.join(FIXTURES, "export_v3_ternary.safetensors")
    meta, layout = read_meta(open(path, "rb").read())
    assert meta["version"] == 3
    assert all(e["shape"] == [] for e in layout if e["key"].endswith("cbp_scale"))
    expected = st_load(open(path.replace(".safetensors", "_expected.safetensors"), "rb").read())
    model = load_packed(path, fixture_net)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert len(model[1].weight.unique()) == 3
    # from version 3 on, the CRC covers the header too, and a failure says so
    data = open(path, "rb").read()
    bad = tmp_path / "v3.safetensors"
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))
    assert_export_error(bad, r"\(header or tensor data fails its CRC-32 check\)$", fixture_net)


def test_a_safetensors_error_is_named_by_its_first_line_or_its_type(exported, monkeypatch):
    """safetensors raises its own error types, some without a message; the CRC passed."""
    import cbp.files.export_read as export_read

    path, _ = exported
    for err, reason in ((RuntimeError("bad offsets\ndetails"), "bad offsets"),
                        (RuntimeError(), "RuntimeError")):
        def st_load_failing(data, err=err):
            raise err
        monkeypatch.setattr(export_read, "st_load", st_load_failing)
        assert_export_error(path, rf"corrupted safetensors file \({reason}\)$")


def test_model_that_does_not_fit(exported):
    path, _ = exported
    assert_export_error(path, r"0.weight has shape \(8, 3, 3, 3\) in the file, \(8, 1, 3, 3\)",
                        builder=lambda: nn.Sequential(nn.Conv2d(1, 8, 3), *list(small_net())[1:]))
    assert_export_error(path, "missing 14.bias", builder=lambda: nn.Sequential(
        *small_net(), nn.Linear(10, 2)))
    # the first three keys by name, then " ..." only if there are more
    assert_export_error(path, "unexpected 13.bias, 13.weight, 9.weight$", builder=lambda: nn.Sequential(
        *list(small_net())[:9]))
    assert_export_error(path, r"missing 14.bias, 14.weight, 15.bias \.\.\.$",
                        builder=lambda: nn.Sequential(*small_net(), nn.Linear(10, 2), nn.Linear(2, 2)))
    assert_export_error(path, "must return an nn.Module", builder=lambda: "resnet20", names_file=False)


def test_write_is_atomic(tmp_path, exported, monkeypatch):
    path, data = exported

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(ExportError, match="cannot write .*: disk full"):
        export(prepared_net("binary"), path)
    assert path.read_bytes() == data and os.listdir(tmp_path) == [path.name]
    with pytest.raises(ExportError, match="cannot write"):
        export(prepared_net("binary"), tmp_path / "no" / "such" / "dir.safetensors")


def forge(path, header: dict, payload: bytes) -> None:
    """Write a safetensors file by hand: ``header`` (our metadata without its CRC) and ``payload``,
    with the CRC export would compute, so only the fault planted in them is left to find."""
    meta = json.loads(header["__metadata__"]["cbp"])
    meta["crc32"] = checksum(header, payload)
    text = json.dumps({**header, "__metadata__": {"cbp": json.dumps(meta)}}).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + payload)


def rewrite_meta(path, data, **changes):
    """The export ``data`` with entries of our metadata replaced, CRC left as it was."""
    meta, _ = read_meta(data)
    path.write_bytes(st_save(st_load(data), metadata={"cbp": json.dumps({**meta, **changes})}))


def test_short_and_truncated_files_by_hand(tmp_path, exported):
    path, data = exported
    size = header_size(path)
    payload = len(data) - 8 - size   # the last tensor ends where the file ends
    cases = {b"\0" * 7: "not a cbp export .only 7 bytes.$",
             b"\0" * 8: r"not a safetensors file, or its header is corrupted \(JSONDecodeError\)$",
             data[: 8 + size - 1]: f"truncated .header claims {size} bytes, file has {8 + size - 1}.$",
             data[:-1]: f"truncated file .tensor data ends at byte {payload} of the payload, "
                        f"only {payload - 1} present.$"}
    for cut, match in cases.items():
        path.write_bytes(cut)
        assert_export_error(path, match)


def test_corrupted_metadata_by_hand(tmp_path, exported):
    path, data = exported
    meta, _ = read_meta(data)
    rewrite_meta(path, data, crc32=str(meta["crc32"]))   # a CRC that is not a number
    assert_export_error(path, r"corrupted cbp metadata \(layout or crc32\)$")
    not_a_list = base64.b64encode(zlib.compress(b"{}")).decode()
    rewrite_meta(path, data, layout=not_a_list)
    assert_export_error(path, r"corrupted cbp metadata \(layout or crc32\)$")
    # a character outside base64 is refused, not skipped (the CRC is recomputed: only it is wrong)
    resave(path, data, edit_meta=lambda meta: meta.update(layout=meta["layout"] + "!"))
    assert_export_error(path, r"corrupted cbp metadata \(layout: Error\)$")


def test_corrupted_tensors_by_hand(tmp_path, exported):
    """Forged files (CRC recomputed) whose tensors do not match their layout: named, not crashed on."""
    path, data = exported
    resave(path, data, edit_tensors=lambda t: t.pop("int64"))
    assert_export_error(path, "tensor 'int64' holding '1.num_batches_tracked' is missing or malformed$")

    def shapes(**new):   # layout edits that keep every group's total size
        def edit(layout):
            for key, shape in new.items():
                entry(layout, key.replace("_", ".", 1))["shape"] = shape
        return edit
    resave(path, data, edit_layout=shapes(**{"1_running_var": [9], "3_cbp_factors": [4]}))
    assert_export_error(path, r"levels of '3.weight' do not match its layout \(\(4,\) factors, 1 scales\)$")
    resave(path, data, edit_layout=shapes(**{"3_cbp_scale": [2], "4_weight": [7]}))
    assert_export_error(path, r"levels of '3.weight' do not match its layout \(\(5,\) factors, 2 scales\)$")

    # 3.weight: 5 levels in groups of 24 indices in 56 bits; a first group of value 5**24 < 2**56
    # has digits 0 (23 times), then 5: one past the last level.
    def first_group(tensors):
        tensors["packed"][:7] = torch.tensor(list((5**24).to_bytes(7, "little")), dtype=torch.uint8)
    resave(path, data, edit_tensors=first_group)
    assert_export_error(path, "corrupted '3.weight': level index 5 of 5 levels$")


def test_safetensors_refusal_is_reported_with_its_reason(tmp_path):
    """A header that passes our checks and its CRC but that safetensors refuses (2 float32 in 4
    bytes): an ExportError with safetensors' own first line as the reason."""
    layout = base64.b64encode(zlib.compress(b"[]")).decode()
    header = {"__metadata__": {"cbp": json.dumps({"format": "cbp-packed", "version": 3, "layout": layout})},
              "float32": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}
    path = tmp_path / "m.safetensors"
    forge(path, header, bytes(4))
    with pytest.raises(Exception) as refusal:
        st_load(path.read_bytes())
    reason = str(refusal.value).splitlines()[0]
    assert reason and not isinstance(refusal.value, ExportError)
    assert_export_error(path, re.escape(f"corrupted safetensors file ({reason})") + "$")


def test_version_2_crc_failure_names_the_tensor_data(tmp_path):
    data = open(os.path.join(FIXTURES, "export_v2_ternary.safetensors"), "rb").read()
    path = tmp_path / "v2.safetensors"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    assert_export_error(path, r"corrupted file \(tensor data fails its CRC-32 check\)$", fixture_net)


def test_export_refuses_to_replace_a_file_that_is_not_an_export(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"a run's checkpoint")
    with pytest.raises(ExportError, match=f"^refusing to replace {re.escape(str(path))}: "
                                          r"it is not a cbp export \("):
        export(prepared_net(), path)
    assert path.read_bytes() == b"a run's checkpoint"


def test_export_refuses_to_replace_a_file_it_cannot_read(tmp_path, monkeypatch):
    """A file that cannot be read cannot be shown to be an earlier export: it is kept. (The tests
    may run as root, which reads any file: the read error is raised by hand.)"""
    path = tmp_path / "unreadable.safetensors"
    path.write_bytes(b"somebody's file")
    read_bytes = type(path).read_bytes
    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)
    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(ExportError, match=f"^refusing to replace {re.escape(str(path))}: "
                                          r"it is not a cbp export \("):
        export(prepared_net(), path)
    monkeypatch.undo()
    assert path.read_bytes() == b"somebody's file"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_degenerate_models_round_trip(tmp_path):
    """No tensors at all (a header-only file), and a weight with a zero-size dimension."""
    for model, payload in ((nn.Sequential(nn.ReLU()), 0), (nn.Sequential(nn.Linear(0, 2)), 2 * 4)):
        path = export(model, tmp_path / f"m{payload}.safetensors")
        assert os.path.getsize(path) == 8 + header_size(path) + payload
        state = cbp.read_packed(path)
        assert list(state) == list(model.state_dict())
        for key, value in model.state_dict().items():
            assert state[key].shape == value.shape and torch.equal(state[key], value)


def test_float64_model_is_rebuilt_in_float64(tmp_path):
    """The levels are float32 buffers; the weights rebuilt from them take the layer's dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 40), nn.Linear(40, 30), nn.Linear(30, 2)).double()
    cbp.prepare(model, cbp.CBPConfig(levels="shift1"))
    state = cbp.read_packed(export(model, tmp_path / "m.safetensors"))
    layer = cbp.quantized_layers(model)["1"]
    assert layer.cbp_factors.dtype == torch.float32 and state["1.weight"].dtype == torch.float64
    assert torch.equal(state["1.weight"], cbp.quantize(layer.weight, layer.levels))


def test_header_json_is_compact(tmp_path, exported):
    """The metadata and the layout are written without JSON whitespace (a smaller header)."""
    path, data = exported
    raw = json.loads(data[8 : 8 + split(data)])["__metadata__"]["cbp"]
    meta, layout = read_meta(data)
    text = zlib.decompress(base64.b64decode(meta["layout"])).decode()
    for compact, value in ((raw, meta), (text, layout)):
        assert compact == json.dumps(value, separators=(",", ":"))


def test_layout_is_compressed_at_zlibs_best_level(tmp_path):
    """The layout in the header takes the fewest bytes zlib can make of it: a transformer's has
    long repetitive keys, and zlib's default level leaves this one a byte (a base64 quad) longer."""
    model = cbp.prepare(tiny_gpt(), cbp.CBPConfig("ternary", **CBP_SELECTION))
    meta, _ = read_meta(export(model, tmp_path / "m.safetensors").read_bytes())
    stored = base64.b64decode(meta["layout"])
    text = zlib.decompress(stored)
    assert len(stored) == len(zlib.compress(text, 9)) < len(zlib.compress(text))
