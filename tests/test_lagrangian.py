"""The multiplier/schedule object as a state machine, its updates, and resume."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import _assert_same

import cbp
from cbp.core.constraint import constraint, constraint_and_grad, sawtooth


def three_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def epoch_with_sum(lagrangian, value):
    """One 'epoch' whose L_sum is exactly `value` (the multipliers are zero, so no penalty)."""
    lagrangian.step()
    return lagrangian.end_epoch(torch.tensor(value))


def test_g_increments_follow_the_paper():
    config = cbp.CBPConfig()
    assert [config.g_increment(g) for g in (1, 9, 10, 90, 100, 1000)] == [1, 1, 10, 10, 100, 100]


def test_schedule_state_machine_with_hand_written_l_sums():
    config = cbp.CBPConfig(p_max=3, lr_drop_at_g=3, multiplier_lr=0.0,
                           initial_multiplier_update=False)
    model = cbp.prepare(three_linear(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # not 1: lr = factor would pass as lr *= factor
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    sums = [10, 9, 9.5, 8, 7, 6, 5, 5, 4]
    # epoch 3: 9.5 >= 9 -> update; epoch 6: p reaches p_max -> update (g = 3: lr drop);
    # epoch 8: 5 >= 5 -> update.
    events = [epoch_with_sum(lagrangian, s) for s in sums]
    assert [e.updated for e in events] == [0, 0, 1, 0, 0, 1, 0, 1, 0]
    assert [e.g for e in events] == [1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert [e.lr_dropped for e in events] == [0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert [e.lagrangian_sum for e in events] == sums
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert lagrangian.p == 1 and lagrangian.lagrangian_sum_pre == 4


def test_schedule_crosses_ten_and_hundred_and_finishes():
    config = cbp.CBPConfig(p_max=1, stop_once_g_exceeds=100, multiplier_lr=0.0, lr_drop_at_g=None)
    lagrangian = cbp.Lagrangian(cbp.prepare(three_linear(), config), config)
    gs = []
    while not lagrangian.finished:
        gs.append(epoch_with_sum(lagrangian, 1.0).g)
    assert gs == [2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200]


def test_no_constraint_mode_runs_the_clock_without_multipliers():
    config = cbp.CBPConfig(use_constraint=False, p_max=1)
    lagrangian = cbp.Lagrangian(cbp.prepare(three_linear(), config), config)
    assert all(epoch_with_sum(lagrangian, 1.0).updated for _ in range(3))
    assert lagrangian.g == 4 and lagrangian.multipliers == {}
    assert cbp.Lagrangian(cbp.prepare(three_linear()), cbp.CBPConfig(g_init=math.inf)).g == math.inf


def test_no_window_mode_keeps_g_infinite_and_constrains_every_weight():
    config = cbp.CBPConfig(g_init=math.inf, p_max=1, multiplier_rule="plain", multiplier_lr=1.0,
                           initial_multiplier_update=False)
    model = cbp.prepare(three_linear(), config)
    lagrangian = cbp.Lagrangian(model, config)
    end = epoch_with_sum(lagrangian, 1.0)
    assert end.updated and end.g == math.inf and lagrangian.g == math.inf
    for name, lam in lagrangian.multipliers.items():   # cs = Y: no weight is ever free
        layer = model.get_submodule(name)
        assert torch.equal(lam, sawtooth(layer.weight.detach(), layer.levels))


def test_plain_rule_adds_eta_times_cs_at_the_new_g():
    config = cbp.CBPConfig(multiplier_rule="plain", multiplier_lr=0.5, p_max=1)
    model = cbp.prepare(three_linear(), config)
    layer = model[2]
    with torch.no_grad():  # one weight in each region: outer arm, g=1 window, on a level
        a = float(layer.cbp_scale)
        layer.weight.view(-1)[:3] = torch.tensor([1.5 * a, 0.75 * a, a])
    w = layer.weight.detach().clone()
    lagrangian = cbp.Lagrangian(model, config)
    lam0 = lagrangian.multipliers["2"].clone()
    assert torch.allclose(lam0, 0.5 * constraint(w, layer.levels, 1.0))  # initial update at g=1
    assert lam0.view(-1)[:3].tolist() == pytest.approx([0.5 * a, 0.0, 0.0])
    epoch_with_sum(lagrangian, 0.0)  # p_max = 1: update with g = 2
    lam1 = lagrangian.multipliers["2"]
    assert torch.allclose(lam1, lam0 + 0.5 * constraint(w, layer.levels, 2.0))
    assert lam1.view(-1)[1].item() == pytest.approx(0.25 * a)  # 0.75a is outside the g=2 window


def test_adam_rule_raises_lambda_by_about_eta_where_constrained_and_never_lowers_it():
    config = cbp.CBPConfig(multiplier_lr=1e-3, p_max=1, g_init=math.inf)
    model = cbp.prepare(three_linear(), config)
    lagrangian = cbp.Lagrangian(model, config)
    for name, lam in lagrangian.multipliers.items():
        layer = model.get_submodule(name)
        off_level = constraint(layer.weight.detach(), layer.levels, math.inf) > 0
        assert torch.allclose(lam[off_level], torch.full_like(lam[off_level], 1e-3), rtol=1e-4)
        assert torch.all(lam[~off_level] == 0)
    before = {k: v.clone() for k, v in lagrangian.multipliers.items()}
    epoch_with_sum(lagrangian, 0.0)
    assert all(torch.all(lagrangian.multipliers[k] >= before[k]) for k in before)


def test_step_adds_lambda_times_slope_clips_and_clamps():
    config = cbp.CBPConfig(grad_clip_value=0.01, weight_clamp=0.05, g_init=math.inf)
    model = cbp.prepare(three_linear(), config)
    lagrangian = cbp.Lagrangian(model, config)  # no optimizer: the step only edits grads/weights
    layer = model[2]
    loss = model(torch.randn(5, 4)).sum()
    loss.backward()
    layer.weight.data.mul_(100)
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    slope = constraint_and_grad(layer.weight.detach(), layer.levels, math.inf)[1]
    lam = lagrangian.multipliers["2"].clone()
    lagrangian.step()
    for name, p in model.named_parameters():   # every gradient clipped to [-0.01, 0.01]
        w, grad = before[name]
        added = lam * slope if name == "2.weight" else 0
        assert torch.equal(p.grad, (grad + added).clamp(-0.01, 0.01)), name
        # only the quantized weights are clamped to [-0.05, 0.05]
        assert torch.equal(p.detach(), w.clamp(-0.05, 0.05) if name == "2.weight" else w), name
    assert (layer.weight == 0.05).any() and (layer.weight == -0.05).any()
    assert model[0].weight.abs().max() > 0.05


def run_steps(model, optimizer, lagrangian, batches, epoch_len, loss_sum=0.0):
    """Steps and epoch ends; returns the loss sum of the unfinished epoch (resume passes it on)."""
    for i, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        lagrangian.step()
        loss_sum = loss_sum + loss.detach()  # not in place: the saved partial sum is reused
        if (i + 1) % epoch_len == 0:
            lagrangian.end_epoch(loss_sum)
            loss_sum = 0.0
    return loss_sum


def build(config):
    model = cbp.prepare(three_linear(), config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    return model, optimizer, cbp.Lagrangian(model, config, optimizer)


@pytest.mark.parametrize("rule", ["adam", "plain"])
def test_state_dict_round_trip_resumes_bit_identically(rule):
    config = cbp.CBPConfig(levels="ternary", multiplier_lr=1e-2, p_max=2, multiplier_rule=rule)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen))
               for _ in range(40)]
    model, optimizer, lagrangian = build(config)
    partial = run_steps(model, optimizer, lagrangian, batches[:17], epoch_len=4)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "cbp": lagrangian.state_dict()})
    run_steps(model, optimizer, lagrangian, batches[17:], epoch_len=4, loss_sum=partial)

    resumed, resumed_opt, resumed_lagr = build(config)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_lagr.load_state_dict(saved["cbp"])
    run_steps(resumed, resumed_opt, resumed_lagr, batches[17:], epoch_len=4, loss_sum=partial)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert lagrangian.g == resumed_lagr.g > 1
    for k in lagrangian.multipliers:
        assert torch.equal(lagrangian.multipliers[k], resumed_lagr.multipliers[k])


def test_no_constraint_state_round_trips():
    """STE-only holds no multiplier and no ascent state; its clock still resumes."""
    config = cbp.CBPConfig(use_constraint=False, p_max=3)
    lagrangian = cbp.Lagrangian(cbp.prepare(three_linear(), config), config)
    epoch_with_sum(lagrangian, 2.0)   # p = 1, L_sum_pre = 2: no update yet
    state = lagrangian.state_dict()
    assert state["ascent"] is None and state["multipliers"] == {}
    resumed = cbp.Lagrangian(cbp.prepare(three_linear(), config), config)
    resumed.load_state_dict(state)
    assert (resumed.g, resumed.p, resumed.lagrangian_sum_pre) == (1.0, 1, 2.0)


def test_state_without_ascent_state_loads():
    """A plain-rule state from before format 2 holds ``"ascent": None``: the rest still loads."""
    config = cbp.CBPConfig(multiplier_rule="plain", p_max=3)
    _, _, lagrangian = build(config)
    epoch_with_sum(lagrangian, 2.0)
    _, _, resumed = build(config)
    resumed.load_state_dict({**lagrangian.state_dict(), "ascent": None})
    assert (resumed.p, resumed.lagrangian_sum_pre) == (1, lagrangian.lagrangian_sum_pre)
    for name, lam in lagrangian.multipliers.items():
        assert torch.equal(resumed.multipliers[name], lam)


def test_load_state_dict_takes_the_old_epoch_sum_at_an_epochs_end_and_names_what_is_missing():
    """An older cbp kept loss + penalty together as ``epoch_sum``: zero at an epoch's end (then it
    is the penalty sum too), not separable in mid-epoch. A table that is no state names its gaps."""
    config = cbp.CBPConfig()
    _, _, lagrangian = build(config)
    old = {key: value for key, value in lagrangian.state_dict().items() if key != "penalty_sum"}
    _, _, resumed = build(config)
    resumed._penalty_sum += 7.0
    resumed.load_state_dict({**old, "epoch_sum": torch.zeros((), dtype=torch.float64)})
    assert float(resumed.state_dict()["penalty_sum"]) == 0.0
    with pytest.raises(ValueError, match="^this CBP state was saved in the middle of an epoch"):
        resumed.load_state_dict({**old, "epoch_sum": torch.ones((), dtype=torch.float64)})
    with pytest.raises(ValueError, match="^not a Lagrangian.state_dict\\(\\): penalty_sum missing$"):
        resumed.load_state_dict(old)
    with pytest.raises(ValueError, match="^not a Lagrangian.state_dict\\(\\): multipliers, g, p, "
                                         "lagrangian_sum_pre, lr_dropped, penalty_sum missing$"):
        resumed.load_state_dict({})


def test_load_state_dict_rejects_another_model():
    config = cbp.CBPConfig()
    _, _, lagrangian = build(config)
    other = cbp.Lagrangian(cbp.prepare(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3),
                                                     nn.Linear(3, 2))), config)
    with pytest.raises(ValueError, match="does not match|wrong shape"):
        other.load_state_dict(lagrangian.state_dict())


def test_param_groups_decay_only_conv_and_linear_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    decay, no_decay = cbp.param_groups(model, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0


def test_epoch_sum_includes_lambda_times_cs_by_hand():
    """L = loss + sum(lambda * cs) at every step; one epoch of two steps, worked out by hand."""
    config = cbp.CBPConfig(levels="binary", g_init=4.0, initial_multiplier_update=False)
    model = cbp.prepare(three_linear(), config)
    lagrangian = cbp.Lagrangian(model, config)   # no optimizer: the weights stay put
    layer, lam = model[2], lagrangian.multipliers["2"]
    a = float(layer.cbp_scale)
    with torch.no_grad():   # every weight on a level but three; lambda 0 but for those three
        layer.weight.fill_(a)
        layer.weight.view(-1)[:3] = torch.tensor([1.5 * a, 0.5 * a, 0.1 * a])
        lam.view(-1)[:3] = torch.tensor([2.0, 3.0, 5.0])
    # g = 4: the window of (-a, a) is |w| < a / 4. 1.5a: outer arm, cs = 2 * 0.5a = a;
    # 0.5a: outside the window, cs = 2 * (a - 0.5a) = a; 0.1a: inside it, cs = 0.
    penalty = 2.0 * a + 3.0 * a + 5.0 * 0.0
    lagrangian.step()
    lagrangian.step()
    end = lagrangian.end_epoch(torch.tensor(1.0))   # the loop's loss sum over the two steps
    assert end.lagrangian_sum == pytest.approx(1.0 + 2 * penalty, rel=1e-6)
    lagrangian.step()                                # the next epoch starts from zero
    assert lagrangian.end_epoch(0.5).lagrangian_sum == pytest.approx(0.5 + penalty, rel=1e-6)
    # a Python float is summed in float64, as the loop's sum is: 100000001 has no float32
    assert lagrangian.end_epoch(100_000_001.0).lagrangian_sum == 100_000_001.0


def hand_epochs(model, optimizer, lagrangian, losses, steps=2):
    """Epochs whose loss sums are given (the penalty, small, is added to them); the decisions."""
    ends = []
    for loss in losses:
        for _ in range(steps):
            optimizer.zero_grad()
            lagrangian.step()
        ends.append(lagrangian.end_epoch(loss))
    return ends


# (L_sums before the save, after it, the updates after it, g at the end): the save comes
# mid-cycle - p != 0, L_sum_pre finite - and one step into the next epoch. Case 1: only p says
# that the first epoch after it reaches p_max; case 2: only L_sum_pre says that it rose; case 3:
# the lr was dropped before the save (at g = 2), so forgetting that drops it a second time.
@pytest.mark.parametrize("before, after, updates, final_g", [
    ([10, 9], [8, 7, 6, 5, 5, 4], [1, 0, 0, 1, 0, 0], 3),
    ([10], [11, 9, 8, 8.5, 7], [1, 0, 0, 1, 0], 3),
    ([10, 11, 10, 9], [8, 7, 6, 5], [1, 0, 0, 1], 4)])
def test_resume_mid_cycle_and_mid_epoch_continues_the_schedule_exactly(before, after, updates,
                                                                        final_g):
    config = cbp.CBPConfig(levels="ternary", multiplier_lr=1e-2, p_max=3, lr_drop_at_g=2)
    model, optimizer, lagrangian = build(config)
    hand_epochs(model, optimizer, lagrangian, before)
    optimizer.zero_grad()
    lagrangian.step()   # half of the next epoch: its penalty so far is part of the state
    assert lagrangian.p != 0 and math.isfinite(lagrangian.lagrangian_sum_pre)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "cbp": lagrangian.state_dict()})
    optimizer.zero_grad()
    lagrangian.step()
    straight = [lagrangian.end_epoch(after[0])] + hand_epochs(model, optimizer, lagrangian,
                                                              after[1:])

    resumed, resumed_opt, resumed_lagr = build(config)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_lagr.load_state_dict(saved["cbp"])
    _assert_same(resumed_lagr.state_dict(), saved["cbp"], "loaded")
    resumed_opt.zero_grad()
    resumed_lagr.step()
    again = [resumed_lagr.end_epoch(after[0])] + hand_epochs(resumed, resumed_opt, resumed_lagr,
                                                             after[1:])
    assert [e.updated for e in straight] == updates and straight[-1].g == final_g
    assert again == straight
    _assert_same(resumed_lagr.state_dict(), lagrangian.state_dict(), "cbp")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_lagrangian_refuses_an_empty_state_and_the_old_api_and_warns_without_backward():
    model = cbp.prepare(_mlp(), cbp.CBPConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lagrangian = cbp.Lagrangian(model, cbp.CBPConfig(), optimizer)
    with pytest.raises(ValueError, match="not a Lagrangian.state_dict.*multipliers, g, p"):
        lagrangian.load_state_dict({})
    before = model[2].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"penalty alone; call loss.backward\(\) before step"):
        lagrangian.step()
    model.zero_grad()
    before = model[2].weight.detach().clone()
    loss = model(torch.randn(3, 4)).sum()
    loss.backward()
    with pytest.raises(TypeError, match=r"pass the sum to end_epoch\(loss_sum\)"):
        lagrangian.step(loss)
    assert torch.equal(model[2].weight, before)
    lagrangian.step()
    assert not torch.equal(model[2].weight, before)
    with pytest.raises(TypeError, match=r"end_epoch\(loss_sum\) needs the epoch's summed"):
        lagrangian.end_epoch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_is_float32_multipliers_and_a_float64_penalty_sum_whatever_the_models_dtype(dtype):
    config = cbp.CBPConfig(levels="binary")
    model = cbp.prepare(three_linear().to(dtype), config)
    state = cbp.Lagrangian(model, config).state_dict()
    assert {lam.dtype for lam in state["multipliers"].values()} == {torch.float32}
    assert state["penalty_sum"].dtype == torch.float64
