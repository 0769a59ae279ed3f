"""CBP on a small learnable problem: every quantized weight ends on a level, the loss stays close
to full precision, and the same training without the constraint term does not quantize."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cbp


def teacher_data(n=2048, dim=16, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen)
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def full_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def train(model, x, y, optimizer, lagrangian=None, epochs=30, epoch_len=16, batch=64):
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        loss_sum = 0.0
        for _ in range(epoch_len):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if lagrangian is None:
                optimizer.step()
            else:
                lagrangian.step()
                loss_sum += loss.detach()
        if lagrangian is not None:
            lagrangian.end_epoch(loss_sum)
            if lagrangian.finished:
                return


@pytest.fixture(scope="module")
def pretrained():
    x, y = teacher_data()
    model = mlp()
    train(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-3), epochs=40)
    return model, x, y, full_loss(model, x, y)


def quantize_with_cbp(pretrained, levels, use_constraint=True):
    model, x, y, _ = pretrained
    config = cbp.CBPConfig(levels=levels, use_constraint=use_constraint, multiplier_lr=2e-3,
                           p_max=2, stop_once_g_exceeds=100, lr_drop_at_g=20)
    model = cbp.prepare(_copy(model), config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 0.0), lr=0.05, momentum=0.9)
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    train(model, x, y, optimizer, lagrangian, epochs=60)
    return model, lagrangian


def _copy(model):
    clone = mlp()
    clone.load_state_dict(model.state_dict())
    return clone


def test_pretraining_learns(pretrained):
    model, x, y, loss = pretrained
    assert loss < 0.3


@pytest.mark.parametrize("levels", ["binary", "ternary", "shift1", "shift2"])
def test_cbp_puts_every_weight_on_a_level_at_little_cost(pretrained, levels):
    _, x, y, fp_loss = pretrained
    model, lagrangian = quantize_with_cbp(pretrained, levels)
    assert lagrangian.finished  # the schedule ran to completion (g > 100)
    for stats in cbp.layer_stats(model):
        # CFS is in weight units; relative to the layer's scale it is ~0 (FP starts near 0.5-1).
        assert stats["cfs"] / stats["scale"] < 0.04
        assert stats["mean_distance"] < 0.02
        assert stats["on_levels"] > 0.95
    # The quantized forward is the network's; its loss stays close to full precision.
    assert full_loss(model.eval(), x, y) < fp_loss + 0.25


@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_without_the_constraint_weights_stay_off_the_levels(pretrained, levels):
    model, _ = quantize_with_cbp(pretrained, levels, use_constraint=False)
    for stats in cbp.layer_stats(model):
        assert stats["cfs"] / stats["scale"] > 0.3
        assert stats["mean_distance"] > 0.15
        assert stats["on_levels"] < 0.2
