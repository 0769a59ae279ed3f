"""The converted model as an ONNX file, checked against onnxruntime (the ``onnx`` extra)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..core.layers import convert
from .export import ExportError, check_replaceable, write_file


class MissingDependencyError(ExportError, ImportError):
    """An optional dependency (the ``onnx`` extra) is not installed."""


def _onnx_runtime():
    """``onnxruntime``, after checking the whole ``onnx`` extra is importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(f"ONNX support needs the onnx extra ({err.name} is missing): "
                                     f"pip install cbp[onnx]") from None
    return onnxruntime


def _is_onnx_model(data: bytes) -> bool:
    try:
        import onnx

        model = onnx.ModelProto()
        model.ParseFromString(data)
        return model.ir_version > 0 and len(model.graph.node) > 0
    except Exception:  # protobuf raises its own error types; any means "not an ONNX model"
        return False


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor) -> Path:
    """Write ``cbp.convert(model)`` (weights on their levels) as ONNX, batch dimension dynamic."""
    _onnx_runtime()
    check_replaceable(Path(path), _is_onnx_model, "an ONNX model")
    plain = convert(model).eval()
    program = torch.onnx.export(plain, (example_input,), dynamo=True, external_data=False,
                                input_names=["input"], output_names=["output"], verbose=False,
                                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    path = Path(path)
    write_file(path, program.model_proto.SerializeToString())
    return path


def check_onnx(path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor,
               atol: float = 1e-5) -> float:
    """Largest gap between onnxruntime's outputs and ``model``'s own (in eval mode, on a copy);
    ExportError above ``atol``. The reference is the model as trained, not ``cbp.convert``'s
    copy, so a conversion that changed what the model computes is caught here too."""
    ort = _onnx_runtime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: example_input.detach().cpu().numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
    except Exception as err:  # onnxruntime raises its own error types for unreadable models
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"{path}: onnxruntime cannot run it ({reason})") from None
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(example_input).cpu()
    if got.shape != expected.shape:
        raise ExportError(f"{path}: ONNX output shape {tuple(got.shape)}, "
                          f"PyTorch {tuple(expected.shape)}")
    diff = (got.to(expected.dtype) - expected).abs().max().item() if got.numel() else 0.0
    if not diff <= atol:
        raise ExportError(f"{path}: ONNX output differs from PyTorch by {diff:.3g} (atol {atol})")
    return diff
