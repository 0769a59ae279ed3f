"""Oscillation tracking, the oscillation fixes of cbp.training.peers, STE-only's clock and BN re-estimation.

Every figure is worked out by hand from a weight sequence written into the layer.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import _assert_same

import cbp
from cbp.core.constraint import constraint_and_grad, quantize
from cbp.core.oscillation import OscillationTracker, level_index
from cbp.training.peers import (
    IterativeFreezing,
    OscillationDampening,
    OscillationGatedCBP,
    build,
    cosine_anneal,
)
from cbp.training.train import Run, fit


def toy(levels="ternary"):
    """Linear-Linear-Linear; the middle one (4 weights, scale a = 0.1) is quantized."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.1, -0.1], [0.1, 0.1]]))
    return cbp.prepare(model, cbp.CBPConfig(levels))


def put(model, factors):
    """Set the quantized weights to ``factors * a`` (flattened order)."""
    layer = model[1]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(factors).view(2, 2) * layer.cbp_scale)


def test_level_index_matches_quantize_and_sends_midpoints_down():
    levels = torch.tensor([-1.0, 0.0, 1.0])
    w = torch.tensor([-2.0, -0.5, -0.49, 0.0, 0.5, 0.51, 3.0])
    index = level_index(w, levels)
    assert index.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert torch.equal(levels[index.long()], quantize(w, levels))


def test_tracker_counts_flips_oscillations_late_flippers_and_level_changes_by_hand():
    model = toy()
    put(model, [1, -1, 1, 1])
    tracker = OscillationTracker(model, momentum=0.5)
    # w0 travels down, up (reversal), down (reversal); w1 up, up (a traveller); w2 never moves;
    # w3 flips once, at the last step.
    for state in ([0, 0, 1, 1], [1, 1, 1, 1]):
        put(model, state)
        tracker.step()
    first = tracker.epoch_stats()
    assert first["flips_per_step"] == 2 and first["oscillations_per_step"] == 0.5
    assert first["late_flippers"] == 0.5        # 2 steps so far, late: after 1.5: w0, w1 (step 2)
    for state in ([0, 1, 1, 1], [0, 1, 1, 0]):
        put(model, state)
        tracker.step()
    second = tracker.epoch_stats()
    assert second["flips_per_step"] == 1 and second["oscillations_per_step"] == 0.5
    # w0's EMA: 0 -> 0.5 -> 0.75 -> 0.375 (no reversal at the last step); the others stay 0
    assert second["oscillation_frequency"] == pytest.approx(0.375 / 4)
    assert second["late_flippers"] == 0.25      # last flips at steps 3, 2, never, 4; late: after 3
    assert second["level_changes"] == 0.75      # w0, w1, w3 left their starting level
    assert tracker.steps == 4


def test_default_momentum_is_nagels_and_the_state_is_11_bytes_per_weight():
    """At the default m = 0.01 a first reversal sets the frequency to m and decays it by 1 - m
    (at m = 0.5 a swapped m and 1 - m would give the same numbers); the state's dtypes are the
    module docstring's 11 bytes per weight, the counts exact integers."""
    model = toy()
    put(model, [1, 1, 1, 1])
    tracker = OscillationTracker(model)
    for state in ([0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]):   # w0 down, back up, stays
        put(model, state)
        tracker.step()
    assert tracker.frequency["1"].flatten().tolist() == pytest.approx([0.01 * 0.99, 0, 0, 0])
    state = tracker.state_dict()
    dtypes = {key: state[key]["1"].dtype for key in
              ("index", "start", "direction", "frequency", "last_flip")}
    assert dtypes == {"index": torch.int8, "start": torch.int8, "direction": torch.int8,
                      "frequency": torch.float32, "last_flip": torch.int32}
    assert sum(t.element_size() for t in (state[k]["1"] for k in dtypes)) == 11
    assert state["counts"].dtype == torch.int64 and state["counts"].tolist() == [2, 1]
    assert level_index(torch.tensor([-0.7, 0.2, 0.9]), torch.tensor([-1.0, 0.0, 1.0])).dtype \
        == torch.int8


def test_tracker_state_round_trips():
    model = toy()
    tracker = OscillationTracker(model, momentum=0.5)
    for state in ([1, 1, 1, 1], [-1, 1, 0, 1], [1, 1, 0, 1]):
        put(model, state)
        tracker.step()
    copy = OscillationTracker(model, momentum=0.5)
    copy.load_state_dict(tracker.state_dict())
    put(model, [-1, 0, 0, 1])
    tracker.step()
    copy.step()
    assert tracker.epoch_stats() == copy.epoch_stats()


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


def _schedule_events(config, epochs=40, seed=0):
    """Train a small prepared model on fixed random data; per epoch (g, lr, finished)."""
    torch.manual_seed(seed)
    model = cbp.prepare(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                      nn.Linear(16, 3)), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    events = []
    for _ in range(epochs):
        loss_sum = 0.0
        for i in range(0, 64, 16):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            lagrangian.step()
            loss_sum += float(loss.detach())
        end = lagrangian.end_epoch(loss_sum)
        events.append((end.g, optimizer.param_groups[0]["lr"], lagrangian.finished))
        if lagrangian.finished:
            break
    return events


def test_ste_only_runs_cbps_clock_lr_drop_and_stop():
    common = dict(levels="ternary", p_max=1, stop_once_g_exceeds=100, lr_drop_at_g=20,
                  multiplier_lr=1e-2)
    cbp_events = _schedule_events(cbp.CBPConfig(**common))
    ste_events = _schedule_events(cbp.CBPConfig(**common, use_constraint=False))
    assert ste_events == cbp_events
    assert len(ste_events) == 19 and ste_events[-1][2]            # g passes 100 at epoch 19
    assert [lr for _, lr, _ in ste_events].index(pytest.approx(0.01)) == 9   # g = 20 at epoch 10
    # with p_max > 1 STE-only follows the same rule on its own loss sums: g rises at least every
    # p_max epochs and the run still drops its lr and stops
    slow = _schedule_events(cbp.CBPConfig(**{**common, "p_max": 3}, use_constraint=False), 80)
    rises = [i for i in range(1, len(slow)) if slow[i][0] > slow[i - 1][0]]
    assert slow[-1][2] and max(b - a for a, b in zip([-1] + rises, rises)) <= 3
    assert slow[-1][1] == pytest.approx(0.01)


def test_recalibrate_bn_changes_only_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    cbp.prepare(model, cbp.CBPConfig("binary"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cbp.recalibrate_bn(model, [(torch.randn(8, 1, 8, 8) * 3 + 1, None) for _ in range(3)], 3)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{s}" for i in (1, 4) for s in ("running_mean", "running_var",
                                                             "num_batches_tracked")}


def test_build_names_each_peer_and_the_gate_is_stepped_once_per_step(tmp_path):
    """``peers.build`` is the one name -> method dispatch (CLI and benchmarks), and under ``fit``
    the gated variant's tracker is the one the loop logs, stepped once per step, not twice."""
    config = cbp.CBPConfig("ternary")
    assert type(build(None, toy(), config)) is cbp.Lagrangian
    assert build("dampen", toy(), config, total_steps=7).total_steps == 7
    assert build("freeze", toy(), config, total_steps=3, momentum=0.5).tracker.momentum == 0.5
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
