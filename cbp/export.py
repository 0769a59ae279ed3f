"""A truly small saved model: quantized weights as packed level indices in one safetensors file.

Layout of a file written by :func:`export` (format ``cbp-packed``, version 4):

* tensor ``packed`` (uint8): the level indices of every quantized layer ``L``, packed by
  :func:`cbp.packing.pack_indices` in base-k groups near log2 k bits per weight (1 bit binary,
  1.586 ternary, 2.333 shift1, 2.8125 shift2), one layer after another, each starting on a byte;
* one tensor per other dtype, named by it (``float32``, ``int64``, ...): every other
  ``state_dict`` entry - first/last layer, biases, BatchNorm and its running statistics, and each
  quantized layer's ``L.cbp_factors`` / ``L.cbp_scale`` exactly as the prepared model holds them,
  so that the rebuilt weights ``(factors * scale)[index]`` are bit-identical to what its forward
  uses - flattened and concatenated in ``state_dict`` order. ``cbp_scale`` is one value, or with
  per-channel scales one per output channel (shape ``(out, 1, ...)``), each weight's level then
  taken from its own channel's; readers before per-channel scales refuse such a file (its levels
  "do not match its layout");
* the header's metadata key ``"cbp"``: JSON ``{"format", "version", "crc32", "layout"}``;
  ``layout`` is the zlib-compressed, base64-encoded JSON list of the ``state_dict`` entries in
  order, ``{"key", "shape", "dtype"}`` plus ``"n_levels"`` and ``"group"`` (``[indices, bits]``
  per group) for packed weights, or ``{"key", "tied"}`` for a Parameter stored once under the
  earlier key ``tied`` (tied weights, :mod:`cbp.ties`); ``crc32`` covers everything the reader uses (see
  :func:`checksum`): a flipped bit, or two layout entries swapped, is an error, not a silently
  worse model.

Version 3 files (no ``"tied"`` entries: a tied weight written twice) and version 2 files
(``"bits"`` per index in place of ``"group"``, a CRC of the tensor data alone) still load.

Why so few tensors: safetensors spends about 100 header bytes per tensor, and a ResNet-20 has 168
``state_dict`` entries - 16 KB of header against 50 KB of binary weights and float parts. Grouped,
the header is about 1 KB, and the file is within a few percent of the ideal size.

No pickle anywhere. Files are written atomically, so an existing export is never half-overwritten.
The size table of a model is :mod:`cbp.summary`; the ONNX file, :mod:`cbp.onnx_export`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .checkpoint import WriteError, atomic_write
from .constraint import level_index, level_values, scaled_levels
from .layers import convert, quantized_layers
from .packing import Grouping, field_grouping, grouping, pack_indices, unpack_indices
from .ties import share_as_stored, tied_keys

FORMAT = "cbp-packed"
VERSION = 4
READABLE = (2, 3, 4)   # 3: no "tied" entries; 2: one ceil(log2 k)-bit field per index, CRC of data
PACKED = "packed"  # the tensor holding every packed weight
_META_KEY = "cbp"
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


class ExportError(ValueError):
    """A file that is not a valid cbp export, or one that does not fit the given model."""


# -- writing ---------------------------------------------------------------------------------------

def packed_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every tensor :func:`export` writes, by key, and the layout of the packed and tied ones.

    A float key tied to an earlier float key is only a layout entry ``{"tied": earlier key}``.
    ``cbp.summary`` sizes its table from these, so its totals are the export's payload exactly.
    """
    # Own, contiguous copies: safetensors refuses tensors sharing memory (tied weights).
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
               for k, v in model.state_dict().items()}
    layout = {}
    for name, layer in quantized_layers(model).items():
        key = f"{name}.weight" if name else "weight"
        weight, levels = layer.weight.detach(), layer.levels.detach()
        index = level_index(weight, levels, torch.int64)  # the level forward uses
        group = grouping(levels.shape[0])
        tensors[key] = pack_indices(index, group)
        layout[key] = {"shape": list(weight.shape), "n_levels": group.levels,
                       "group": [group.size, group.bits],
                       "dtype": str(weight.dtype).removeprefix("torch.")}
    for key, first in tied_keys(model).items():
        if key not in layout and first not in layout:   # packed copies are small: kept as they are
            del tensors[key]
            layout[key] = {"tied": first}
    return tensors, layout


def _is_packed_export(data: bytes) -> bool:
    try:
        meta = _read_header(data, "")["__metadata__"][_META_KEY]
        return json.loads(meta)["format"] == FORMAT
    except (ExportError, KeyError, TypeError, ValueError):
        return False


def check_replaceable(path: Path, ours: Callable[[bytes], bool], what: str) -> None:
    """An existing file is replaced only if it is an earlier ``what``: never a checkpoint (its
    run would be gone) or any other file cbp did not write."""
    if not path.exists():
        return
    try:
        earlier = path.is_file() and ours(path.read_bytes())
    except OSError:
        earlier = False
    if not earlier:
        raise ExportError(f"refusing to replace {path}: it is not {what} (a checkpoint, or a "
                          "file of yours?); choose another path, or delete it first")


def write_file(path: Path, data: bytes) -> None:
    """Atomic write (never a half-written file) with the error as an ``ExportError``."""
    try:
        atomic_write(str(path), lambda f: f.write(data))
    except WriteError as err:   # it names the file already
        raise ExportError(str(err)) from err
    except OSError as err:
        raise ExportError(f"{path}: cannot write ({err.strerror or err})") from err


def _grouped(order: list[str], tensors: dict[str, torch.Tensor],
             packed: dict[str, dict]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One flat tensor per group (``packed``, or a dtype name) and the layout that splits them."""
    groups: dict[str, list[torch.Tensor]] = {}
    layout = []
    for key in order:
        tensor = tensors.get(key)
        if tensor is None:
            layout.append({"key": key, **packed[key]})
        elif key in packed:
            groups.setdefault(PACKED, []).append(tensor)
            layout.append({"key": key, **packed[key]})
        else:
            dtype = str(tensor.dtype).removeprefix("torch.")
            groups.setdefault(dtype, []).append(tensor.flatten())
            layout.append({"key": key, "shape": list(tensor.shape), "dtype": dtype})
    return {name: torch.cat(parts) for name, parts in groups.items()}, layout


def export(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` (prepared or plain) as one packed safetensors file; return its path."""
    grouped, layout = _grouped(list(model.state_dict()), *packed_tensors(model))
    encoded = base64.b64encode(zlib.compress(json.dumps(layout, separators=(",", ":")).encode(), 9))
    meta = {"format": FORMAT, "version": VERSION, "layout": encoded.decode()}
    unsigned = st_save(grouped, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
    # the tensor table and payload do not depend on the metadata: the CRC can be taken first
    meta["crc32"] = checksum(_read_header(unsigned, "export"), _payload(unsigned))
    data = st_save(grouped, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
    path = Path(path)
    check_replaceable(path, _is_packed_export, "a cbp export")
    write_file(path, data)
    return path


# -- reading ---------------------------------------------------------------------------------------

def _payload(data: bytes) -> bytes:
    """The tensor bytes of a safetensors file: everything after the 8-byte length and the header."""
    return data[8 + int.from_bytes(data[:8], "little") :]


def checksum(header: dict, payload: bytes) -> int:
    """CRC-32 of all a version-3 reader uses: the safetensors tensor table, every metadata entry
    (ours without its ``crc32``), and the tensor bytes.

    The header enters as canonical JSON (sorted keys), so the writer and the reader, which parse
    it, agree byte for byte; ``header`` must hold valid cbp metadata.
    """
    metadata = dict(header["__metadata__"])
    ours = json.loads(metadata[_META_KEY])
    ours.pop("crc32", None)
    covered = {**header, "__metadata__": {**metadata, _META_KEY: ours}}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()
    return zlib.crc32(payload, zlib.crc32(text))


def _read_header(data: bytes, where: str) -> dict:
    """The safetensors header of ``data``, checked just enough to name the fault."""
    if len(data) < 8:
        raise ExportError(f"{where}: not a cbp export (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ExportError(f"{where}: not a safetensors file, or truncated "
                          f"(header claims {size} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + size])
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        payload_end = max(ends, default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError,
            TypeError) as err:
        raise ExportError(f"{where}: not a safetensors file, or its header is corrupted "
                          f"({type(err).__name__})") from None
    if not isinstance(payload_end, int) or payload_end > len(data) - 8 - size:
        raise ExportError(f"{where}: truncated file (tensor data ends at byte {payload_end} "
                          f"of the payload, only {len(data) - 8 - size} present)")
    return header


def _entry_grouping(entry: dict, version: int) -> Grouping:
    """How a packed entry's indices are grouped; ``ValueError``/``KeyError``/``TypeError`` if bad."""
    n_levels = entry["n_levels"]
    if version == 2:
        group = field_grouping(n_levels)
        if entry["bits"] != group.bits:
            raise ValueError("bits")
        return group
    size, bits = entry["group"]
    return Grouping(n_levels, size, bits)


def _valid_entry(entry: dict, version: int) -> bool:
    """Type-checks one layout entry; a packed one gains ``"grouping"``."""
    if "tied" in entry:
        return version >= 4 and set(entry) == {"key", "tied"} and all(
            isinstance(value, str) for value in entry.values())
    try:
        ok = (isinstance(entry["key"], str)
              and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
              and isinstance(getattr(torch, entry["dtype"], None), torch.dtype))
        if ok and "n_levels" in entry:
            entry["grouping"] = _entry_grouping(entry, version)
            ok = entry["dtype"] in _FLOAT_DTYPES
    except (TypeError, KeyError, ValueError):
        ok = False
    return ok


def _read_layout(header: dict, where: str) -> tuple[list[dict], int, int]:
    """The layout in our metadata, every entry type-checked, the CRC and the format version."""
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise ExportError(f"{where}: a safetensors file without cbp metadata; "
                          f"was it written by cbp.export?")
    try:
        info = json.loads(meta[_META_KEY])
        fmt, version, crc, encoded = info["format"], info["version"], info["crc32"], info["layout"]
    except (TypeError, KeyError, json.JSONDecodeError) as err:
        raise ExportError(f"{where}: corrupted cbp metadata ({type(err).__name__})") from None
    if fmt != FORMAT:
        raise ExportError(f"{where}: unknown format {fmt!r}, expected {FORMAT!r}")
    if version not in READABLE or isinstance(version, bool):
        raise ExportError(f"{where}: format version {version!r} is not supported "
                          f"(this cbp reads versions {', '.join(map(str, READABLE))})")
    try:
        layout = json.loads(zlib.decompress(base64.b64decode(encoded, validate=True)))
    except (TypeError, ValueError, zlib.error) as err:   # binascii.Error is a ValueError
        raise ExportError(f"{where}: corrupted cbp metadata (layout: {type(err).__name__})") from None
    if not isinstance(layout, list) or not isinstance(crc, int):
        raise ExportError(f"{where}: corrupted cbp metadata (layout or crc32)")
    for entry in layout:
        if not isinstance(entry, dict) or not _valid_entry(entry, version):
            raise ExportError(f"{where}: corrupted cbp metadata for "
                              f"{entry.get('key') if isinstance(entry, dict) else None!r}: {entry!r}")
    return layout, crc, version


def _split(grouped: dict[str, torch.Tensor], layout: list[dict],
           where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Cut the group tensors back into ``(float entries, packed weights)`` by key."""
    state, packed, used = {}, {}, dict.fromkeys(grouped, 0)
    for entry in [e for e in layout if "tied" not in e]:
        key, count = entry["key"], math.prod(entry["shape"])
        group = PACKED if "grouping" in entry else entry["dtype"]
        size = entry["grouping"].nbytes(count) if group == PACKED else count
        flat = grouped.get(group)
        expected = torch.uint8 if group == PACKED else getattr(torch, group)
        if flat is None or flat.dim() != 1 or flat.dtype != expected:
            raise ExportError(f"{where}: tensor {group!r} holding {key!r} is missing or malformed")
        start = used[group]
        if start + size > flat.numel():
            raise ExportError(f"{where}: corrupted file: tensor {group!r} ends inside {key!r} "
                              f"({flat.numel()} entries, {key!r} needs {start + size})")
        used[group] = start + size
        piece = flat[start : start + size]
        if group == PACKED:
            packed[key] = piece
        else:
            state[key] = piece.view(entry["shape"])
    for group, count in used.items():
        if count != grouped[group].numel():
            raise ExportError(f"{where}: corrupted file: tensor {group!r} holds "
                              f"{grouped[group].numel() - count} entries that no layer uses")
    return state, packed


def _unpack_weight(entry: dict, packed: torch.Tensor, state: dict[str, torch.Tensor],
                   where: str) -> torch.Tensor:
    """The float weight of one packed layer: its levels indexed by the unpacked indices."""
    key = entry["key"]
    prefix = key.removesuffix("weight")
    try:
        factors, scale = state.pop(prefix + "cbp_factors"), state.pop(prefix + "cbp_scale")
    except KeyError as err:
        raise ExportError(f"{where}: tensor {err.args[0]!r} is missing") from None
    shape, n_levels = entry["shape"], entry["n_levels"]
    per_channel = (shape[0], *[1] * (len(shape) - 1))   # one scale per output channel
    if factors.shape != (n_levels,) or (scale.numel() != 1 and tuple(scale.shape) != per_channel):
        raise ExportError(f"{where}: levels of {key!r} do not match its layout "
                          f"({tuple(factors.shape)} factors, {scale.numel()} scales)")
    index = unpack_indices(packed, entry["grouping"], math.prod(shape))
    if index.numel() and index.max() >= n_levels:
        raise ExportError(f"{where}: corrupted {key!r}: level index {int(index.max())} "
                          f"of {n_levels} levels")
    levels = scaled_levels(factors, scale).to(getattr(torch, entry["dtype"]))  # as the layer's
    return level_values(index.view(shape), levels)


def read_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The float ``state_dict`` stored in an export: packed weights rebuilt on their levels, and a
    tied key holding the very tensor of the key it is tied to."""
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ExportError(f"{where}: cannot read ({err.strerror})") from None
    header = _read_header(data, where)
    layout, crc, version = _read_layout(header, where)
    if (checksum(header, _payload(data)) if version >= 3 else zlib.crc32(_payload(data))) != crc:
        covered = "header or tensor data" if version >= 3 else "tensor data"
        raise ExportError(f"{where}: corrupted file ({covered} fails its CRC-32 check)")
    try:
        grouped = st_load(data)
    except Exception as err:  # safetensors raises its own (Rust) error types for any fault
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"{where}: corrupted safetensors file ({reason})") from None
    state, packed = _split(grouped, layout, where)
    weights = {e["key"]: _unpack_weight(e, packed[e["key"]], state, where)
               for e in layout if "grouping" in e}
    state.update(weights)   # the levels and scales went into the weights: not float-model state
    for entry in (e for e in layout if "tied" in e):
        if entry["tied"] not in state:
            raise ExportError(f"{where}: corrupted cbp metadata: {entry['key']!r} is tied to "
                              f"{entry['tied']!r}, which the file does not hold before it")
        state[entry["key"]] = state[entry["tied"]]
    return {e["key"]: state[e["key"]] for e in layout if e["key"] in state}  # state_dict order


def _check_fits(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise ExportError(f"{where}: does not fit the model: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ExportError(f"{where}: does not fit the model: {key} has shape "
                              f"{tuple(state[key].shape)} in the file, {tuple(tensor.shape)} "
                              f"in the model")


def load_packed(path: str | os.PathLike,
                model_builder: Callable[[], nn.Module] | nn.Module) -> nn.Module:
    """A plain float model, in eval mode, computing what the exported prepared model computed.

    ``model_builder`` builds the float architecture (``lambda: build_model(...)``), or is that
    model itself, which is then filled in place (a prepared one is converted first). Its
    Parameters end up shared as the file's tensors are (:func:`cbp.ties.share_as_stored`).
    """
    state = read_packed(path)
    model = model_builder if isinstance(model_builder, nn.Module) else model_builder()
    if not isinstance(model, nn.Module):
        raise ExportError(f"model_builder must return an nn.Module, got {type(model).__name__}")
    convert(model, inplace=True)
    _check_fits(state, model, str(path))
    share_as_stored(model, state)
    model.load_state_dict(state)
    return model.eval()
