"""benchmarks/step_time.py times the quantized modes on one shared model, so that CBP/STE is the
price of the constraint term and not the difference between two models' places in memory."""

import importlib.util
import os
import sys

import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "step_time.py")
_spec = importlib.util.spec_from_file_location("bench_step_time", _PATH)
step_time = sys.modules["bench_step_time"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)


def test_quantized_modes_share_the_model_and_differ_in_the_penalty_only():
    cpu = torch.device("cpu")
    ste_model, ste_update, ste_lag, opt = step_time.build("resnet20", "ste", "binary", "adam", cpu)
    model, update, lag, opt2 = step_time.build("resnet20", "cbp_eager", "binary", "adam", cpu,
                                               (ste_model, opt))
    fp_model = step_time.build("resnet20", "fp", "binary", "adam", cpu, (ste_model, opt))[0]
    assert model is ste_model and opt2 is opt and fp_model is not model
    assert not ste_lag.multipliers and lag.multipliers and not lag.config.compile_penalty
    x, y = step_time.inputs("resnet20", 4, cpu, torch.Generator().manual_seed(0))
    grads = {}
    for name, upd in (("ste", ste_update), ("cbp", update)):
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()
        layer = next(iter(lag.layers.values()))
        before = layer.weight.grad.clone()
        # the step's gradient change on a quantized weight: STE clips it, CBP adds the penalty too
        with torch.no_grad():
            upd(None)
        grads[name] = (layer.weight.grad - before.clamp(-1, 1)).abs().sum()
    assert grads["ste"] == 0 and grads["cbp"] > 0


def test_image_size_replaces_height_and_width():
    x, y = step_time.inputs("resnet18", 2, torch.device("cpu"), image_size=32)
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,)
