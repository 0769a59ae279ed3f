"""Reading a file of :func:`cbp.files.export.export` back: :func:`read_packed`, :func:`load_packed`.

Every field of the header is checked before it is used (the layout, each entry's levels and
grouping, the CRC-32 of everything read), so a corrupted or foreign file is one ``ExportError``
naming the fault, never a silently worse model. Versions 2 and 3 of the format still load (see
:mod:`cbp.files.export` for the layout).
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

from ..core.constraint import level_values, scaled_levels
from ..core.layers import convert
from .export import (
    FLOAT_DTYPES,
    FORMAT,
    META_KEY,
    PACKED,
    READABLE,
    ExportError,
    checksum,
    payload,
    read_header,
)
from .packing import Grouping, field_grouping, unpack_indices
from .ties import share_as_stored


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
            ok = entry["dtype"] in FLOAT_DTYPES
    except (TypeError, KeyError, ValueError):
        ok = False
    return ok


def _read_layout(header: dict, where: str) -> tuple[list[dict], int, int]:
    """The layout in our metadata, every entry type-checked, the CRC and the format version."""
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or META_KEY not in meta:
        raise ExportError(f"{where}: a safetensors file without cbp metadata; "
                          f"was it written by cbp.export?")
    try:
        info = json.loads(meta[META_KEY])
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
    header = read_header(data, where)
    layout, crc, version = _read_layout(header, where)
    if (checksum(header, payload(data)) if version >= 3 else zlib.crc32(payload(data))) != crc:
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
    Parameters end up shared as the file's tensors are (:func:`cbp.files.ties.share_as_stored`).
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
