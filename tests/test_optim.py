"""cbp.CBPOptimizer: the Lagrangian loop behind an optimizer's interface, and its checkpoint."""

import io
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import _assert_same

import cbp

CONFIG = cbp.CBPConfig(levels="ternary", p_max=1, multiplier_lr=1e-2, lr_drop_at_g=3)
X, Y = torch.randn(48, 4, generator=torch.Generator().manual_seed(1)), torch.arange(48) % 2


def model():
    torch.manual_seed(0)
    return cbp.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                     nn.Linear(8, 2)), CONFIG)


def wrapped(net):
    return cbp.CBPOptimizer(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), CONFIG)


def batches():
    return [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 48, 8)]


def train(net, optimizer, epochs, start=0):
    """``epochs`` epochs of 6 steps with the wrapper; ``start`` steps of the first are skipped."""
    for epoch in range(epochs):
        for x, y in batches()[start if epoch == 0 else 0:]:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            optimizer.add_loss(loss)
        optimizer.end_epoch()


def test_wrapper_is_the_lagrangian_loop_bit_for_bit():
    """The README's Lagrangian loop and the wrapper give the same weights, lambda, g and lr."""
    net, reference = model(), model()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    lagrangian = cbp.Lagrangian(reference, CONFIG, sgd)
    ends = []
    for _ in range(4):
        loss_sum = 0.0
        for x, y in batches():
            sgd.zero_grad()
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            lagrangian.step()
            loss_sum += loss.detach()
        ends.append(lagrangian.end_epoch(loss_sum))
    optimizer = wrapped(net)
    train(net, optimizer, 4)
    _assert_same(net.state_dict(), reference.state_dict(), "weights")
    _assert_same(optimizer.lagrangian.state_dict(), lagrangian.state_dict(), "cbp")
    assert optimizer.lagrangian.g == ends[-1].g == 5      # p_max = 1: g rises every epoch
    assert optimizer.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == pytest.approx(0.01)


def test_state_dict_resumes_mid_epoch_exactly():
    """3 steps, a checkpoint through torch.save/weights_only load, a fresh model and optimizer,
    the rest: the same as without the interruption (the loss sum so far travels too)."""
    net = model()
    optimizer = wrapped(net)
    train(net, optimizer, 3)

    first = model()
    first_opt = wrapped(first)
    for x, y in batches()[:3]:
        first_opt.zero_grad()
        loss = F.cross_entropy(first(x), y)
        loss.backward()
        first_opt.step()
        first_opt.add_loss(loss)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert float(saved["optimizer"]["cbp"]["loss_sum"]) > 0 and "state" in saved["optimizer"]

    resumed = model()
    resumed_opt = wrapped(resumed)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, 3, start=3)
    _assert_same(resumed.state_dict(), net.state_dict(), "weights")
    _assert_same(resumed_opt.state_dict(), optimizer.state_dict(), "optimizer")


def test_plain_optimizer_state_is_refused():
    net = model()
    plain = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no CBP state"):
        wrapped(net).load_state_dict(plain.state_dict())


def test_an_lr_scheduler_on_the_wrapper_moves_the_base_lr():
    """Frameworks build schedulers on the optimizer they are given: the wrapper's param_groups
    are the base optimizer's, and the scheduler's step counter sees the wrapper's steps."""
    net = model()
    optimizer = wrapped(net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    train(net, optimizer, 1)
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.state is optimizer.base_optimizer.state and len(optimizer.state) == 6
    assert optimizer.defaults["momentum"] == 0.9
    optimizer.base_optimizer.warmup_steps = 3   # any other attribute: the base optimizer's
    assert optimizer.warmup_steps == 3
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = optimizer.no_such_thing
    # built without __init__ (as pickle and copy build it, before its state): a plain
    # AttributeError for the missing base optimizer, not a recursion through __getattr__
    bare = cbp.CBPOptimizer.__new__(cbp.CBPOptimizer)
    with pytest.raises(AttributeError, match="^base_optimizer$"):
        _ = bare.lr
    assert not hasattr(bare, "lr")


def test_importing_cbp_imports_no_framework():
    code = ("import sys, cbp; bad = {'lightning', 'transformers', 'accelerate'} & set(sys.modules);"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_zero_grad_and_the_loss_sum_as_torch_optimizers_do():
    """No closure: step returns None; zero_grad sets gradients to None unless told to zero
    them; the losses added sum in float64, exactly."""
    net = model()
    optimizer = wrapped(net)
    F.cross_entropy(net(X[:8]), Y[:8]).backward()
    assert optimizer.step() is None

    def closure():   # as Lightning passes one: forward and backward, returns the loss
        optimizer.zero_grad()
        loss = F.cross_entropy(net(X[8:16]), Y[8:16])
        loss.backward()
        return loss
    assert float(optimizer.step(closure).detach()) > 0
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())
    optimizer.add_loss(0.5)
    optimizer.add_loss(torch.tensor(0.25))
    optimizer.add_loss(1e-12)   # lost in float32's sum of 0.75
    loss_sum = optimizer.state_dict()["cbp"]["loss_sum"]
    assert loss_sum.dtype == torch.float64 and float(loss_sum) == 0.75 + 1e-12
    end = optimizer.end_epoch()   # p_max 1: g rises, on L_sum = the losses plus the penalty
    assert end.updated and end.g == optimizer.lagrangian.g > CONFIG.g_init
    assert end.lagrangian_sum >= 0.75 and float(optimizer.state_dict()["cbp"]["loss_sum"]) == 0
    planned = []
    optimizer.lagrangian.plan = planned.append
    optimizer.plan(7)
    assert planned == [7]


def test_cbps_state_follows_a_model_moved_after_the_optimizer_was_built():
    """The Hugging Face Trainer moves the model to the GPU after the optimizer exists: the
    multipliers, their Adam moments, the penalty and loss sums follow at the next step or sum
    (checked here with the "meta" device, which every machine has); the multipliers stay the
    tensors the ascent rule holds, and Adam's step counts stay where torch keeps them."""
    net = model()
    optimizer = wrapped(net)
    lagrangian = optimizer.lagrangian
    multipliers = dict(lagrangian.multipliers)
    loss_sum = optimizer._loss_sum
    assert lagrangian._ascent.state   # the initial update made Adam's moments on the CPU
    net.to("meta")
    assert lagrangian.device.type == "cpu"   # until the next step or epoch end
    lagrangian.follow_the_model()
    assert lagrangian.device.type == "meta" and lagrangian._penalty_sum.device.type == "meta"
    for name, lam in lagrangian.multipliers.items():
        assert lam is multipliers[name] and lam.device.type == "meta"
    for state in lagrangian._ascent.state.values():
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"
    optimizer.add_loss(torch.ones((), device="meta"))
    assert optimizer._loss_sum is loss_sum and loss_sum.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_moved_to_the_gpu_after_the_optimizer_trains_as_one_built_there():
    on_cpu_first, on_gpu = model(), model().cuda()
    late = wrapped(on_cpu_first)
    on_cpu_first.cuda()
    early = wrapped(on_gpu)
    for net, optimizer in ((on_cpu_first, late), (on_gpu, early)):
        for _ in range(2):
            for x, y in batches():
                optimizer.zero_grad()
                loss = F.cross_entropy(net(x.cuda()), y.cuda())
                loss.backward()
                optimizer.step()
                optimizer.add_loss(loss)
            optimizer.end_epoch()
    for (name, a), b in zip(on_cpu_first.state_dict().items(), on_gpu.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert late.lagrangian.g == early.lagrangian.g
