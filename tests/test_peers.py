"""cbp.training.peers: oscillation dampening, iterative freezing and the oscillation-gated CBP.

Every figure is worked out by hand from a weight sequence written into the layer.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from conftest import _assert_same, put, toy

import cbp
from cbp.core.constraint import constraint_and_grad, quantize
from cbp.training.peers import (
    IterativeFreezing,
    OscillationDampening,
    OscillationGatedCBP,
    build,
    cosine_anneal,
)
from cbp.training.train import Run, fit


def test_cosine_anneal_follows_nagel_et_al():
    values = [cosine_anneal(s, 4, 0.0, 0.1, 0.25) for s in (0, 1, 2, 4, 9)]
    assert values == pytest.approx([0.0, 0.0, 0.1 - 0.05 * (1 + math.cos(math.pi / 3)), 0.1, 0.1])


def test_dampening_gradient_is_autograd_of_the_kernel_mean_term():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    torch.manual_seed(0)
    cbp.prepare(model, cbp.CBPConfig("ternary"))
    layer = model[1]
    with torch.no_grad():  # one weight beyond the last level: the clip gives it no gradient
        layer.weight.view(-1)[0] = 1.5 * layer.cbp_scale
    config = cbp.CBPConfig("ternary", use_constraint=False)
    damp = OscillationDampening(model, config, None, total_steps=4, strength=0.1, begin=0.25)
    damp.steps = 2
    weighting = damp.weighting()
    assert weighting == pytest.approx(0.025)
    w = layer.weight.detach().clone().requires_grad_(True)
    levels = layer.levels
    target = quantize(w, levels).detach()
    term = weighting * ((target - w.clamp(levels[0], levels[-1])) ** 2).sum(0).mean()
    (expected,) = torch.autograd.grad(term, w)
    layer.weight.grad = None
    damp.add_dampening_grad()
    assert torch.allclose(layer.weight.grad, expected, atol=1e-9)
    assert layer.weight.grad.view(-1)[0] == 0 and expected.abs().sum() > 0
    damp.steps = 0   # before 25% of the steps the term is off
    layer.weight.grad = None
    damp.add_dampening_grad()
    assert layer.weight.grad is None


def test_freezing_holds_a_weight_on_its_level_once_it_oscillates_often_enough():
    model = toy()
    put(model, [1, 0, 0, 1])
    config = cbp.CBPConfig("ternary", use_constraint=False)
    freeze = IterativeFreezing(model, config, None, total_steps=8, threshold=0.3,
                               final_threshold=0.3, begin=0.25, momentum=0.5)
    a = float(model[1].cbp_scale)
    # w0 alternates -a, +a, -a, +a, ...: EMA 0, 0.5, 0.75 at steps 0-2; freezing starts at step 2
    # (25% of 8) with the threshold 0.3 and freezes it on its EMA level, -a at that moment.
    for k in range(6):
        put(model, [-1 if k % 2 == 0 else 1, 0, 0, 1])
        freeze.step()
        assert bool(freeze.frozen["1"].view(-1)[0]) == (k >= 2)
    assert model[1].weight.view(-1).tolist() == pytest.approx([-a, 0, 0, a])
    assert freeze.epoch_stats() == {"frozen": 0.25}
    assert freeze.tracker.epoch_stats()["oscillations_per_step"] == pytest.approx(2 / 6)


def test_gated_cbp_pulls_only_weights_seen_oscillating():
    model = toy()
    put(model, [0.8, -0.8, 0.8, 0.8])            # outside the g = 10 window: pulled to +-a
    config = cbp.CBPConfig("ternary", multiplier_lr=0.5, multiplier_rule="plain", g_init=10)
    gated = OscillationGatedCBP(model, config, None, threshold=0.3, momentum=0.5)
    lam = gated.multipliers["1"]
    assert lam.min() > 0
    model[1].weight.grad = torch.zeros(2, 2)
    assert float(gated.add_penalty_grad()) == 0 and model[1].weight.grad.abs().sum() == 0
    for state in ([-0.8, -0.8, 0.8, 0.8], [0.8, -0.8, 0.8, 0.8], [-0.8, -0.8, 0.8, 0.8]):
        put(model, state)                        # w0 flips three times: EMA 0, 0.5, 0.75
        gated.step()
    assert gated.gate["1"].view(-1).tolist() == [True, False, False, False]
    assert gated.epoch_stats() == {"gated": 0.25}
    w = model[1].weight.detach()
    model[1].weight.grad = torch.zeros(2, 2)
    gated.add_penalty_grad()
    cs, slope = constraint_and_grad(w, model[1].levels, gated.g)
    expected = torch.zeros(4)
    expected[0] = (lam * slope).view(-1)[0]
    assert torch.allclose(model[1].weight.grad.view(-1), expected)
    assert expected[0] != 0
    with pytest.raises(ValueError, match="use_constraint"):
        OscillationGatedCBP(toy(), cbp.CBPConfig("ternary", use_constraint=False))


# ---- the peers' settings, optimizer and state (issue 26: what the mutation run found untested) --

PEERS = {
    "dampen": lambda model, config, opt: OscillationDampening(
        model, dataclasses.replace(config, use_constraint=False), opt, total_steps=8, begin=0.25),
    "freeze": lambda model, config, opt: IterativeFreezing(
        model, dataclasses.replace(config, use_constraint=False), opt, total_steps=8,
        threshold=0.3, final_threshold=0.05, begin=0.25, momentum=0.5),
    "gate": lambda model, config, opt: OscillationGatedCBP(model, config, opt, threshold=0.3,
                                                           momentum=0.5),
}
# w0 and w1 oscillate, w2 travels, w3 stays: every peer has frozen / gated / counted by step 3
SEQUENCE = [[-1, 1, 0, 1], [1, -1, 1, 1], [-1, 1, 1, 1], [1, -1, -1, 1], [-1, 1, -1, 1],
            [1, -1, 0, 1]]
PEER_CONFIG = cbp.CBPConfig("ternary", multiplier_lr=0.5, multiplier_rule="plain", g_init=10)


def _put_and_step(peer, model, factors) -> None:
    put(model, factors)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    peer.step()


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_resumed_from_its_state_dict_continues_exactly(name):
    straight_model, resumed_model = toy(), toy()
    straight = PEERS[name](straight_model, PEER_CONFIG, None)
    for factors in SEQUENCE:
        _put_and_step(straight, straight_model, factors)
    first = PEERS[name](resumed_model, PEER_CONFIG, None)
    for factors in SEQUENCE[:3]:
        _put_and_step(first, resumed_model, factors)
    resumed = PEERS[name](resumed_model, PEER_CONFIG, None)
    resumed.load_state_dict(first.state_dict())
    for factors in SEQUENCE[3:]:
        _put_and_step(resumed, resumed_model, factors)
    _assert_same(resumed.state_dict(), straight.state_dict())
    assert torch.equal(resumed_model[1].weight, straight_model[1].weight)
    if name == "dampen":   # its state is its step count
        assert straight.state_dict()["peer_steps"] == len(SEQUENCE)
    else:                  # the peer acted: the state carried frozen / gated weights
        assert resumed.epoch_stats() == straight.epoch_stats()
        assert all(v > 0 for v in straight.epoch_stats().values())


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_steps_the_optimizer_it_was_given(name):
    model = toy()
    bias = model[0].bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    peer = PEERS[name](model, PEER_CONFIG, optimizer)
    model(torch.ones(1, 2)).sum().backward()
    peer.step()
    assert torch.allclose(model[0].bias, bias - 0.1 * model[0].bias.grad)


def test_the_peers_defaults_are_nagel_et_al_s_and_this_projects():
    config = cbp.CBPConfig("ternary", use_constraint=False)
    damp = OscillationDampening(toy(), config, total_steps=4)
    assert [damp.weighting() for damp.steps in (0, 1, 4)] == pytest.approx([0, 0, 0.1])
    freeze = IterativeFreezing(toy(), config, total_steps=4)
    assert [freeze.current_threshold() for freeze.steps in (0, 1, 4)] == pytest.approx(
        [0, 0.1, 0.011])
    assert freeze.tracker.momentum == 0.001
    gated = OscillationGatedCBP(toy(), cbp.CBPConfig("ternary"))
    assert (gated.threshold, gated.tracker.momentum) == (0.015, 0.01)
    assert gated.gate["1"].dtype == torch.bool and not gated.gate["1"].any()
    for cls in (OscillationDampening, IterativeFreezing):   # one step is a schedule; none is not
        assert cls(toy(), config, total_steps=1).total_steps == 1
        with pytest.raises(ValueError, match="total_steps must be >= 1"):
            cls(toy(), config, total_steps=0)
    assert cosine_anneal(4, 4, 1.0, 0.0, 0.75) == 0.0   # one annealing step: at the end at once


def test_gated_penalty_gradient_is_clipped_like_cbps():
    model = toy()
    put(model, [0.8, -0.8, 0.8, 0.8])
    config = cbp.CBPConfig("ternary", multiplier_lr=0.5, multiplier_rule="plain", g_init=10,
                           grad_clip_value=1e-3)
    gated = OscillationGatedCBP(model, config, None)
    gated.gate["1"].fill_(True)
    gated.multipliers["1"].fill_(1e3)   # a pull far beyond the clip
    model[1].weight.grad = torch.zeros(2, 2)
    gated.add_penalty_grad(config.grad_clip_value)
    assert model[1].weight.grad.abs().max() == pytest.approx(1e-3)


def test_build_names_each_peer_and_the_gate_is_stepped_once_per_step(tmp_path):
    """``peers.build`` is the one name -> method dispatch (CLI and benchmarks), and under ``fit``
    the gated variant's tracker is the one the loop logs, stepped once per step, not twice."""
    config = cbp.CBPConfig("ternary")
    assert type(build(None, toy(), config)) is cbp.Lagrangian
    assert build("dampen", toy(), config, total_steps=7).total_steps == 7
    assert build("dampen", toy(), config).total_steps == 1
    assert build("freeze", toy(), config, total_steps=3, momentum=0.5).tracker.momentum == 0.5
    assert build("gate", toy(), config, threshold=0.2).threshold == 0.2
    with pytest.raises(TypeError):   # CBP itself takes no option: none is dropped unread
        build(None, toy(), config, threshold=0.2)
    for name in (None, "dampen", "freeze", "gate"):
        model = toy()
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        assert build(name, model, config, sgd, total_steps=2).optimizer is sgd
    torch.manual_seed(0)
    model = cbp.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                      nn.Linear(8, 3)), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gated = build("gate", model, config, optimizer)
    assert isinstance(gated, OscillationGatedCBP)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    run = Run(model=model, optimizer=optimizer, train_data=data, val_data=data,
              out_dir=str(tmp_path), epochs=2, batch_size=8, ctx=cbp.core.distributed.setup("cpu"),
              lagrangian=gated, show_progress=False)
    rows = fit(run)
    assert run.oscillation is gated.tracker and gated.tracker.steps == 2 * 4
    assert all("gated" in row and "oscillations_per_step" in row for row in rows)
