"""Per-output-channel scales (issue 23): ``CBPConfig(scale="per-channel")`` on a layer whose two
channels differ by 100x - levels, forward, penalty, metrics, peers, export, ONNX and the CLI
each measure a weight against its own channel's ``a_c = mean|W_c|``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from conftest import one_thread
from safetensors.torch import load as st_load

import cbp
from cbp.cli import commands as cli
from cbp.core.constraint import constraint_and_grad, level_index, level_values
from cbp.files.checkpoint import load_checkpoint, save_checkpoint
from cbp.files.export_read import read_packed
from cbp.training.runs import CHECKPOINT_NAME, load_model

# channel 0: a_0 = mean(0.005, 0.02, 0.035) = 0.02; channel 1: a_1 = 2.0, 100 times larger
W = [[0.005, -0.02, 0.035], [0.5, -2.0, 3.5]]


def linear_model(scale: str = "per-channel", levels="ternary") -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W))
        model[0].bias.zero_()
    return cbp.prepare(model, cbp.CBPConfig(levels=levels, scale=scale, skip_first_last=False))


def test_each_channel_gets_its_own_scale_and_levels():
    layer = linear_model()[0]
    assert layer.cbp_scale.shape == (2, 1)
    torch.testing.assert_close(layer.cbp_scale, torch.tensor([[0.02], [2.0]]))
    assert layer.levels.shape == (3, 2, 1)   # levels along dim 0, one column per channel
    # ternary per channel: |w| below a_c / 2 -> 0, else +-a_c (clipped outside the range)
    assert torch.equal(layer.quantized_weight(), torch.tensor([[0.0, -1.0, 1.0]]) * layer.cbp_scale)
    # one scale for the layer, a = 1.01: channel 0 would be all zeros
    per_layer = linear_model("per-layer")[0]
    assert per_layer.cbp_scale.shape == ()
    assert torch.equal(per_layer.quantized_weight()[0], torch.zeros(3))


@pytest.mark.parametrize("levels", ["binary", "ternary", "shift2", [-1.0, -0.3, 0.2, 1.5]],
                         ids=str)
def test_per_channel_equals_per_layer_functions_on_each_channel_alone(levels):
    """The defining property: every function of (w, levels) treats each channel as a layer of
    its own with scale a_c - quantize, level index, constraint and its slope."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2) * torch.tensor([0.01, 1.0, 3.0, 0.2]).view(4, 1, 1, 1)
    conv = nn.Conv2d(3, 4, 2)
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = cbp.prepare(nn.Sequential(conv), cbp.CBPConfig(levels=levels, scale="per-channel",
                                                           skip_first_last=False))[0]
    factors = torch.tensor(cbp.resolve_factors(levels))
    levels_c = layer.levels
    latent = w + 0.3 * torch.randn_like(w) * layer.cbp_scale
    cs, slope = constraint_and_grad(latent, levels_c, 2.0)
    q, index = cbp.quantize(latent, levels_c), level_index(latent, levels_c)
    for c in range(4):
        own = factors * w[c].abs().mean()
        assert torch.equal(q[c], cbp.quantize(latent[c], own))
        assert torch.equal(index[c], level_index(latent[c], own))
        cs_c, slope_c = constraint_and_grad(latent[c], own, 2.0)
        assert torch.equal(cs[c], cs_c) and torch.equal(slope[c], slope_c)
    assert torch.equal(level_values(index.long(), levels_c), q)


def test_metrics_measure_each_weight_against_its_channel():
    model = linear_model()
    # by hand: Y = 2|w - Q(w)| inside the range, 2 (w - q_n) above it
    # channel 0: 0.01, 0, 2 * 0.015;  channel 1: 1.0, 0, 2 * 1.5
    assert cbp.cfs(model) == pytest.approx((0.01 + 0.03 + 1.0 + 3.0) / 6, rel=1e-6)
    (row,) = cbp.layer_stats(model)
    # |w - Q(w)| / a_c: 0.25, 0, 0.75 in both channels
    assert row["mean_distance"] == pytest.approx(1 / 3, rel=1e-6)
    assert row["on_levels"] == pytest.approx(2 / 6)
    assert row["scale"] == pytest.approx((0.02 + 2.0) / 2)


def test_penalty_gradient_and_dampening_follow_the_channels():
    model = linear_model()
    layer = model[0]
    lag = cbp.Lagrangian(model, cbp.CBPConfig(levels="ternary", scale="per-channel",
                                              compile_penalty=False))
    lag.multipliers["0"].fill_(1.0)
    layer.weight.grad = torch.zeros_like(layer.weight)
    value = lag.add_penalty_grad()
    (reference,) = torch.autograd.grad(lag.penalty(), layer.weight)
    assert torch.equal(layer.weight.grad, reference)
    assert float(value) == pytest.approx(float(lag.penalty().detach()))
    # g = 1: the window is the whole tent, so only the two weights above the range are pulled
    assert layer.weight.grad.tolist() == [[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]

    damp = cbp.OscillationDampening(model, lag.config, total_steps=1, begin=0.0)
    damp.steps = 1   # the full strength 0.1
    layer.weight.grad = torch.zeros_like(layer.weight)
    damp.add_dampening_grad()
    # 2 * 0.1 * (w - Q(w)) / 3 inside [-a_c, a_c]: the first weight of each channel
    torch.testing.assert_close(layer.weight.grad[:, 0], torch.tensor([0.005, 0.5]) * 0.2 / 3)
    assert layer.weight.grad[:, 1:].abs().sum() == 0


def test_freezing_pins_weights_on_their_channels_levels():
    model = linear_model()
    freeze = cbp.IterativeFreezing(model, cbp.CBPConfig(levels="ternary", scale="per-channel"),
                                   total_steps=1)
    freeze.frozen["0"][:, 2] = True
    freeze.frozen_index["0"][:, 2] = 0   # the lowest level: -a_c
    freeze._pin()
    assert model[0].weight[:, 2].tolist() == pytest.approx([-0.02, -2.0])


def depthwise_net(scale: str) -> nn.Module:
    """A depthwise conv in the middle (quantized) whose channel 0 is 100x the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with torch.no_grad():
        model[3].weight[0] *= 100
    model(torch.randn(8, 3, 6, 6))
    return cbp.prepare(model, cbp.CBPConfig(levels="ternary", scale=scale)).eval()


def test_export_round_trip_and_size_with_per_channel_scales(tmp_path):
    model = depthwise_net("per-channel")
    layer = model[3]
    assert layer.cbp_scale.shape == (4, 1, 1, 1)
    assert float(layer.cbp_scale[0] / layer.cbp_scale[1:].max()) > 30
    path = cbp.export(model, tmp_path / "m.safetensors")
    snapped = cbp.convert(model).state_dict()
    unpacked = read_packed(path)
    assert unpacked.keys() == snapped.keys()
    assert all(torch.equal(unpacked[k], snapped[k]) for k in snapped)
    assert len(unpacked["3.weight"][1].unique()) <= 3 and unpacked["3.weight"].abs().max() > 1
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(cbp.load_packed(path, lambda: depthwise_net("per-channel"))(x), model(x))
    # the size table counts the scales: per layer's file plus 3 floats (layer 3) and 1 (layer 6)
    per_layer = depthwise_net("per-layer")
    rows = {r.name: r for r in cbp.summary(model).rows}
    # 36 trits in one group of 29 (46 bits) + 7 (12 bits) -> 8 bytes; 4 biases, 3 factors, 4 scales
    assert rows["3"].packed_bytes == 8 + 4 * 4 + 3 * 4 + 4 * 4
    assert cbp.summary(model).packed_bytes == cbp.summary(per_layer).packed_bytes + (3 + 1) * 4
    payload = st_load(path.read_bytes())
    assert sum(t.nbytes for t in payload.values()) == cbp.summary(model).packed_bytes


def test_onnx_of_a_per_channel_model(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = depthwise_net("per-channel")
    path = cbp.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 6, 6))
    assert cbp.check_onnx(path, model, torch.randn(4, 3, 6, 6)) <= 1e-5


def test_a_zero_channel_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[1] = 0
    with pytest.raises(ValueError, match="output channel 1 of layer '0' has all-zero weights"):
        cbp.prepare(model, cbp.CBPConfig(scale="per-channel", skip_first_last=False))
    with pytest.raises(ValueError, match="scale must be one of per-layer, per-channel"):
        cbp.CBPConfig(scale="per-row")


def test_cli_per_channel_run_evaluates_exports_and_resumes_only_per_channel(
        quantize_argv, tmp_path, capsys):
    out = str(tmp_path / "pc")
    with one_thread():
        assert cli.main(quantize_argv(out, 1, "--scale", "per-channel")) == 0
        ckpt = os.path.join(out, CHECKPOINT_NAME)
        assert load_checkpoint(ckpt)["meta"]["scale"] == "per-channel"
        model, _ = load_model(ckpt)
        scales = [layer.cbp_scale for layer in cbp.quantized_layers(model).values()]
        assert all(s.dim() == 4 and s.shape[0] > 1 for s in scales)
        assert cli.main(["export", ckpt, str(tmp_path / "m.safetensors")]) == 0
        capsys.readouterr()
        assert cli.main(quantize_argv(out, 2, "--resume", "--scale", "per-layer")) == 2
        assert "--scale 'per-layer' (the run's: 'per-channel')" in capsys.readouterr().err
        state = load_checkpoint(ckpt)
        state["meta"]["scale"] = "per-row"
        save_checkpoint(state, ckpt)
        assert cli.main(["summary", ckpt]) == 2
        assert "meta.scale must be one of per-layer, per-channel" in capsys.readouterr().err
