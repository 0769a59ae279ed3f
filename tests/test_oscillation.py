"""Oscillation tracking (cbp.core.oscillation) and STE-only's clock; the oscillation fixes built on
the tracker are tested in test_peers.py.

Every figure is worked out by hand from a weight sequence written into the layer.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import put, toy

import cbp
from cbp.core.constraint import quantize
from cbp.core.oscillation import OscillationTracker, level_index


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


def test_a_float64_models_tracker_finds_the_levels_quantize_does():
    """prepare keeps float32 factors for a float64 model; the tracker takes them in the weight's
    dtype, so a weight on the exact float64 midpoint of 0.3 (as float32) and 1 goes down, as
    quantize sends it (that midpoint rounded to float32 lies below it)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))   # scale a = 1
    cbp.prepare(model, cbp.CBPConfig([-1.0, 0.3, 1.0]))
    layer = model[1]
    midpoint = (float(layer.cbp_factors[1]) + 1.0) / 2
    with torch.no_grad():
        layer.weight[1, 0] = midpoint
    index = OscillationTracker(model).index["1"]
    assert index.tolist() == [[2, 0], [1, 2]]
    assert torch.equal(layer.levels[index.long()], quantize(layer.weight.detach(), layer.levels))
