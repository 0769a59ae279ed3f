"""cbp.files.onnx_export: the ONNX export of a prepared model and its check against the model."""

import sys

import pytest
import torch
from conftest import prepared_net

import cbp
from cbp.files.onnx_export import MissingDependencyError, check_onnx, export_onnx


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
