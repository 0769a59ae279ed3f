"""benchmarks/step_time.py times the quantized modes on one shared model, so that CBP/STE is the
price of the constraint term and not the difference between two models' places in memory."""

import importlib.util
import os
import sys

import torch

import cbp

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


def test_distill_mode_adds_the_teachers_term_to_the_cbp_step():
    cpu = torch.device("cpu")
    teacher = step_time.build("resnet20", "fp", "binary", "adam", cpu)[0]
    # CBP's configuration, compiled as "cbp" is (built eager here: compiling takes a minute)
    assert step_time._config("resnet20", step_time.DISTILL_MODE, "binary", "adam") == \
        step_time._config("resnet20", "cbp", "binary", "adam")
    model, update, lag, _ = step_time.build("resnet20", "cbp_eager", "binary", "adam", cpu)
    x, y = step_time.inputs("resnet20", 4, cpu, torch.Generator().manual_seed(0))
    distill = cbp.Distillation(teacher, alpha=1.0)
    grads = []
    for d in (None, distill):
        step_time.make_step(model, lambda loss: None, x, y, d)()   # no update: same weights
        grads.append(next(iter(lag.layers.values())).weight.grad.clone())
    # alpha 1: the gradient is the divergence's alone, not the task loss's
    assert not torch.allclose(grads[0], grads[1])
    assert all(p.grad is None for p in teacher.parameters())
