"""How big a model is as a float ``state_dict`` and as :func:`cbp.export` writes it, per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.layers import quantized_layers
from .export import packed_tensors


@dataclass(frozen=True)
class LayerRow:
    """One module holding state: its size as a float state_dict and as exported."""

    name: str
    kind: str
    params: int
    bits: float  # bits per weight: packed (bits per group / indices per group), else float width
    float_bytes: int
    packed_bytes: int

    @property
    def ratio(self) -> float:
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 1.0


@dataclass(frozen=True)
class Summary:
    """Per-layer sizes and totals; ``packed_bytes`` is exactly the tensor payload of the export."""

    rows: tuple[LayerRow, ...]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.rows)

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 1.0

    def __str__(self) -> str:
        head = ("layer", "kind", "params", "bits", "float bytes", "packed bytes", "ratio")
        body = [(r.name or "(root)", r.kind, f"{r.params:,}", f"{r.bits:.4g}", f"{r.float_bytes:,}",
                 f"{r.packed_bytes:,}", f"{r.ratio:.1f}x") for r in self.rows]
        total = ("total", "", f"{self.params:,}", "", f"{self.float_bytes:,}",
                 f"{self.packed_bytes:,}", f"{self.ratio:.1f}x")
        table = [head, *body, total]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in table]
        rule = "-" * len(lines[0])
        return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def summary(model: nn.Module) -> Summary:
    """Sizes per module holding state (in ``state_dict`` order), as float and as :func:`export`."""
    tensors, layout = packed_tensors(model)
    quantized = quantized_layers(model)
    rows: dict[str, dict] = {}
    for key, tensor in tensors.items():   # a tied key is stored (and counted) once, not here
        name = key.rpartition(".")[0]
        row = rows.setdefault(name, {"float": 0, "packed": 0})
        row["packed"] += tensor.nbytes
        if name in quantized and key.endswith(("cbp_factors", "cbp_scale")):
            continue  # not part of the float model
        row["float"] += model.get_parameter(key).nbytes if key in layout else tensor.nbytes
    result = []
    for name, sizes in rows.items():
        module = model.get_submodule(name)
        params = list(module.parameters(recurse=False))
        weight = getattr(module, "weight", None)
        if name in quantized:
            size, group_bits = layout[f"{name}.weight" if name else "weight"]["group"]
            bits = group_bits / size
        elif isinstance(weight, torch.Tensor):
            bits = weight.element_size() * 8
        else:
            bits = params[0].element_size() * 8 if params else 32
        result.append(LayerRow(name, type(module).__name__, sum(p.numel() for p in params), bits,
                               sizes["float"], sizes["packed"]))
    return Summary(tuple(result))
