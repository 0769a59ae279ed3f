"""A truly small saved model: quantized weights as packed level indices in one safetensors file.

Layout of a file written by :func:`export` (format ``cbp-packed``, version 4):

* tensor ``packed`` (uint8): the level indices of every quantized layer ``L``, packed by
  :func:`cbp.files.packing.pack_indices` in base-k groups near log2 k bits per weight (1 bit binary,
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
  earlier key ``tied`` (tied weights, :mod:`cbp.files.ties`); ``crc32`` covers everything the reader uses (see
  :func:`checksum`): a flipped bit, or two layout entries swapped, is an error, not a silently
  worse model.

Version 3 files (no ``"tied"`` entries: a tied weight written twice) and version 2 files
(``"bits"`` per index in place of ``"group"``, a CRC of the tensor data alone) still load.

Why so few tensors: safetensors spends about 100 header bytes per tensor, and a ResNet-20 has 168
``state_dict`` entries - 16 KB of header against 50 KB of binary weights and float parts. Grouped,
the header is about 1 KB, and the file is within a few percent of the ideal size.

No pickle anywhere. Files are written atomically, so an existing export is never half-overwritten.
The size table of a model is :mod:`cbp.files.summary`; the ONNX file, :mod:`cbp.files.onnx_export`.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save as st_save

from ..core.constraint import level_index
from ..core.layers import quantized_layers
from .checkpoint import WriteError, atomic_write
from .packing import grouping, pack_indices
from .ties import tied_keys

FORMAT = "cbp-packed"
VERSION = 4
READABLE = (2, 3, 4)   # 3: no "tied" entries; 2: one ceil(log2 k)-bit field per index, CRC of data
PACKED = "packed"  # the tensor holding every packed weight
META_KEY = "cbp"
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


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
        meta = read_header(data, "")["__metadata__"][META_KEY]
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
    unsigned = st_save(grouped, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})
    # the tensor table and payload do not depend on the metadata: the CRC can be taken first
    meta["crc32"] = checksum(read_header(unsigned, "export"), payload(unsigned))
    data = st_save(grouped, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})
    path = Path(path)
    check_replaceable(path, _is_packed_export, "a cbp export")
    write_file(path, data)
    return path


# -- the file: payload, checksum and header, for the writer and for cbp.files.export_read ---------------

def payload(data: bytes) -> bytes:
    """The tensor bytes of a safetensors file: everything after the 8-byte length and the header."""
    return data[8 + int.from_bytes(data[:8], "little") :]


def checksum(header: dict, payload: bytes) -> int:
    """CRC-32 of all a version-3 reader uses: the safetensors tensor table, every metadata entry
    (ours without its ``crc32``), and the tensor bytes.

    The header enters as canonical JSON (sorted keys), so the writer and the reader, which parse
    it, agree byte for byte; ``header`` must hold valid cbp metadata.
    """
    metadata = dict(header["__metadata__"])
    ours = json.loads(metadata[META_KEY])
    ours.pop("crc32", None)
    covered = {**header, "__metadata__": {**metadata, META_KEY: ours}}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()
    return zlib.crc32(payload, zlib.crc32(text))


def read_header(data: bytes, where: str) -> dict:
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
