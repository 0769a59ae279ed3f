"""The fast penalty gradient equals autograd of the reference penalty, kinks and edges included."""

import importlib.abc
import importlib.util
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import cbp
import cbp.training.train
from cbp.core.constraint import constraint, constraint_and_grad
from cbp.core.penalty import (
    PenaltyKernel,
    _compile_settings,
    _import_inductor_quietly,
    penalty_grad_,
    penalty_grads_,
)

LEVEL_SETS = [*cbp.LEVEL_SETS, (-2.0, -0.5, 0.0, 1.0, 3.0)]  # the published sets + an uneven one
GS = [1.0, 3.0, 50.0, math.inf]


def special_points(levels: torch.Tensor, g: float) -> torch.Tensor:
    """Every kink of cs(w; g): levels, midpoints, window edges, range ends, outer arms."""
    lo, hi = levels[:-1], levels[1:]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    span = levels[-1] - levels[0]
    outer = torch.stack([levels[0] - 0.3 * span, levels[-1] + 0.3 * span])
    return torch.cat([levels, mid, mid - half / g, mid + half / g, outer,
                      torch.nextafter(levels, levels + 1), torch.nextafter(levels, levels - 1)])


def setup(levels, g: float, compile_penalty=False) -> tuple[cbp.Lagrangian, list[nn.Parameter]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 40), nn.Linear(40, 30), nn.Conv1d(30, 20, 3), nn.Linear(5, 2))
    config = cbp.CBPConfig(levels=levels, initial_multiplier_update=False,
                           compile_penalty=compile_penalty)
    cbp.prepare(model, config)
    lag = cbp.Lagrangian(model, config)
    lag.g = g
    weights = []
    for layer, lam in zip(lag.layers.values(), lag.multipliers.values()):
        w, lv = layer.weight, layer.levels
        points = special_points(lv, g)
        span = float(lv[-1] - lv[0])
        rand = torch.empty(w.numel() - points.numel()).uniform_(float(lv[0]) - span / 4,
                                                                float(lv[-1]) + span / 4)
        with torch.no_grad():
            w.copy_(torch.cat([points, rand])[torch.randperm(w.numel())].view_as(w))
            lam.uniform_(0, 2)
        weights.append(w)
    return lag, weights


def reference(lag: cbp.Lagrangian, weights):
    penalty = lag.penalty()
    return penalty.detach(), torch.autograd.grad(penalty, weights)


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("g", GS)
def test_add_penalty_grad_equals_autograd_of_penalty(levels, g):
    lag, weights = setup(levels, g)
    penalty, grads = reference(lag, weights)
    for w in weights:
        w.grad = torch.full_like(w, 0.25)  # the penalty gradient is added to what is there
    total = lag.add_penalty_grad()
    for w, ref in zip(weights, grads):
        assert torch.equal(w.grad, 0.25 + ref)  # slopes are exactly +-2 or 0: bit for bit
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(float(penalty), rel=1e-5)


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("g", GS)
def test_fused_kernel_equals_reference(levels, g):
    """The function that torch.compile fuses, run eagerly (unrolled interval search, tensor g)."""
    lag, weights = setup(levels, g)
    penalty, grads = reference(lag, weights)
    total = 0.0
    for (layer, lam), ref in zip(zip(lag.layers.values(), lag.multipliers.values()), grads):
        grad = torch.zeros_like(layer.weight)
        total += float(penalty_grad_(layer.weight.detach(), lam, grad, layer.cbp_factors,
                                     layer.cbp_scale, torch.tensor(g)))
        assert torch.equal(grad, ref)
    assert total == pytest.approx(float(penalty), rel=1e-5)


def test_penalty_value_is_lambda_times_constraint_by_hand():
    lag, weights = setup("ternary", 3.0)
    layer, lam = next(iter(lag.layers.values())), next(iter(lag.multipliers.values()))
    a = float(layer.cbp_scale)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(-1)[:3] = torch.tensor([1.5 * a, 0.25 * a, 0.45 * a])
        lam.fill_(0.0)
        lam.view(-1)[:3] = 1.0
        for other in list(lag.multipliers.values())[1:]:
            other.zero_()
    for w in weights:
        w.grad = None
    # 1.5a: outer arm, cs = 2 * 0.5a, slope +2; 0.25a: cs = 0.5a, slope -2 (nearest level 0 below);
    # 0.45a: in the window of (0, a) at g = 3 (|0.45a - 0.5a| < a / 6), cs = 0, slope 0.
    total = lag.add_penalty_grad()
    assert float(total) == pytest.approx(1.0 * a + 0.5 * a, rel=1e-6)
    assert layer.weight.grad.view(-1)[:3].tolist() == [2.0, 2.0, 0.0]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kwargs):
        def raise_(*args):
            raise RuntimeError("no compiler")
        return raise_
    monkeypatch.setattr(torch, "compile", broken)
    lag, weights = setup("shift2", 3.0, compile_penalty=True)
    penalty, grads = reference(lag, weights)
    total = lag.add_penalty_grad()
    assert lag._kernel.failed
    assert all(torch.equal(w.grad, ref) for w, ref in zip(weights, grads))
    assert float(total) == pytest.approx(float(penalty), rel=1e-5)


def test_auto_mode_stays_eager_for_short_runs():
    kernel = PenaltyKernel(None)
    kernel.start_step(torch.device("cpu"))
    assert kernel.compiled is None
    kernel = PenaltyKernel(False)
    kernel.steps = 10**9
    kernel.start_step(torch.device("cpu"))
    assert kernel.compiled is None and kernel.decision == "eager (compile_penalty=False)"


def test_bad_compile_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="compile_penalty must be None"):
        cbp.CBPConfig(compile_penalty="yes")


def test_constraint_and_grad_matches_constraint():
    levels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    w = torch.linspace(-1.5, 1.5, 601)
    for g in GS:
        cs, _ = constraint_and_grad(w, levels, g)
        assert torch.allclose(cs, constraint(w, levels, g), atol=1e-6)


class FakeClock:
    """Each reading ``dt`` later than the one before: every timed eager pass takes ``dt``."""

    def __init__(self, dt: float) -> None:
        self.t, self.dt = 0.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


def run_kernel(kernel: PenaltyKernel, steps: int, layers: int) -> list[int]:
    """``steps`` steps of ``layers`` small layers; the steps at which torch.compile was called."""
    ws = [torch.linspace(-1, 1, 6) for _ in range(layers)]
    compiled_at = []
    for step in range(1, steps + 1):
        before = kernel.compiled
        kernel.start_step(torch.device("cpu"))
        if kernel.compiled is not before:
            compiled_at.append(step)
        kernel(ws, [torch.ones(6)] * layers, [torch.zeros(6) for _ in ws],
               [torch.tensor([-1.0, 1.0])] * layers, [torch.tensor(0.5)] * layers, 1.0)
    return compiled_at


@pytest.mark.parametrize("planned, form", [(100_000, "one-graph"), (3000, "per-layer"),
                                           (300, "eager")])
def test_auto_mode_takes_the_form_with_the_least_estimated_time(monkeypatch, planned, form):
    """20 layers, an eager pass of 8 ms (a binary ResNet-20 on this CPU), 5 steps timed (the
    first untimed), then over the 5 steps done less: eager 8 ms a step; per-layer 8 s + (8/15 ms
    + 20 x 0.1 ms) a step; one-graph 20 x 3 s + 8/15 ms a step."""
    calls, runs = [], []

    def compile_stub(fn, **options):   # the function and options compiled; each compiled call
        calls.append((fn, options))
        return lambda *args, **kwargs: runs.append(fn) or fn(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_stub)
    kernel = PenaltyKernel(None, clock=FakeClock(0.008))
    kernel.plan(planned)
    assert run_kernel(kernel, 5, 20) == [] and kernel.decision is None
    assert run_kernel(kernel, 20, 20) == ([] if form == "eager" else [1])   # step 6 of the run
    remaining = planned - 5
    costs = (remaining * 0.008, 8 + remaining * (0.008 / 15 + 20e-4),
             60 + remaining * 0.008 / 15)
    assert kernel.decision == (
        f"{form}{' compiled in 0.0 s' if form != 'eager' else ''} (eager pass 8.0 ms/step measured; "
        f"estimated over {remaining} steps: eager {costs[0]:.0f} s, per-layer {costs[1]:.0f} s, "
        f"one-graph {costs[2]:.0f} s)")
    # compiled dynamic (one graph for every size); steps 6-25 ran it: per layer, or once a step
    assert calls == {"eager": [], "per-layer": [(penalty_grad_, {"dynamic": True})],
                     "one-graph": [(penalty_grads_, {"dynamic": True})]}[form]
    assert len(runs) == {"eager": 0, "per-layer": 20 * 20, "one-graph": 20}[form]


def test_auto_mode_in_a_loop_of_unknown_length_looks_again_as_it_grows(monkeypatch):
    """No plan: the steps to come are taken to be as many as those done, reconsidered at steps
    6, 12, 24, ... With 2 layers and a 100 ms eager pass, one-graph (6 s + 100/15 ms a step)
    beats eager (100 ms a step) from 65 steps on: over 95 steps at step 96, not over 47 at 48."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    kernel = PenaltyKernel(None, clock=FakeClock(0.1))
    assert run_kernel(kernel, 95, 2) == []
    assert kernel.decision.startswith("eager (eager pass 100.0 ms/step measured; estimated over "
                                      "47 steps: eager 5 s, per-layer 8 s, one-graph 6 s)")
    assert run_kernel(kernel, 10, 2) == [1]
    assert kernel.decision.startswith("one-graph compiled in 0.1 s (eager pass 100.0 ms/step measured; "
                                      "estimated over 95 steps:")


def test_a_plan_announced_mid_run_counts_from_the_step_it_was_made_at():
    """plan(300) after 3 steps: at the decision (step 6) steps 4 and 5 of those 300 are done,
    298 to come."""
    kernel = PenaltyKernel(None, clock=FakeClock(0.008))
    run_kernel(kernel, 3, 2)
    kernel.plan(300)
    run_kernel(kernel, 3, 2)
    assert kernel.decision.startswith("eager (eager pass 8.0 ms/step measured; estimated over "
                                      "298 steps: eager 2 s, ")


def test_a_set_policy_decides_at_the_first_step(monkeypatch):
    """compile_penalty=True compiles the whole pass as one graph at the first step."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn, kw)) or fn)
    on, off = PenaltyKernel(True, clock=FakeClock(2.5)), PenaltyKernel(False)
    assert run_kernel(on, 3, 2) == [1] and run_kernel(off, 3, 2) == []
    assert calls == [(penalty_grads_, {"dynamic": True})]
    assert on.decision == "one-graph compiled in 2.5 s (compile_penalty=True)"
    assert on.compile_seconds == 2.5   # the first call's time, kept: later calls are not timed
    assert off.decision == "eager (compile_penalty=False)"


def test_fit_announces_the_run_length(monkeypatch, tmp_path):
    """``cbp.training.train.fit`` tells the Lagrangian how many steps follow (6 epochs of 4 steps), which
    the automatic compile policy decides on."""
    import tiny_run

    planned = []
    monkeypatch.setattr(cbp.Lagrangian, "plan", lambda self, steps: planned.append(steps))
    cbp.training.train.fit(tiny_run.build(str(tmp_path), "adam"))
    assert planned == [tiny_run.EPOCHS * 64 // tiny_run.BATCH]


def test_fit_prints_the_penalty_pass_it_chose(tmp_path, capsys):
    """A short run (24 steps of a small MLP) stays eager and says so once, with its estimate."""
    import tiny_run

    run = tiny_run.build(str(tmp_path), "adam")
    run.show_progress = True
    cbp.training.train.fit(run)
    said = [line for line in capsys.readouterr().out.splitlines() if "penalty pass" in line]
    assert len(said) == 1 and said[0].startswith("cbp: penalty pass: eager (eager pass ")
    assert "estimated over 19 steps: eager " in said[0]


def test_the_inductor_import_is_quiet_for_every_device_but_a_gpu(monkeypatch):
    """The in-process side of the test below (named so that the mutation selection, which leaves
    out compiling tests, keeps it: it compiles nothing): the quiet import runs for the CPU
    (or any device but a GPU, whose machine has a CUDA runtime), not for a GPU."""
    imported = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(cbp.core.penalty, "_import_inductor_quietly", lambda: imported.append(1))
    for device, count in (("cpu", 1), ("cuda", 1), ("meta", 2)):
        PenaltyKernel(True)._compile("one-graph", torch.device(device))
        assert len(imported) == count, device


def test_compiling_on_a_cpu_machine_prints_no_cuda_notice():
    """Issue 14 item 11: torch's "No CUDA runtime is found, using CUDA_HOME" notice, logged when
    compiling first imports torch.utils.cpp_extension, says nothing about a CPU run."""
    code = ("import torch, cbp.core.penalty as p; k = p.PenaltyKernel(True); "
            "k.start_step(torch.device('cpu')); import torch.utils.cpp_extension")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert "CUDA" not in result.stderr


class _NoisyCppExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A stand-in ``torch.utils.cpp_extension`` that, imported, logs the CUDA notice and one
    other message, as the real one does on a machine without a GPU."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch.utils.cpp_extension":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        log = logging.getLogger("torch.utils.cpp_extension")
        log.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'")
        log.warning("something else worth saying")


def test_inductor_import_drops_only_the_cuda_notice(monkeypatch, caplog):
    """In-process twin of the test above: the filter holds while the module is first imported,
    passes its other messages, and is gone afterwards."""
    import torch.utils

    monkeypatch.delitem(sys.modules, "torch.utils.cpp_extension", raising=False)
    monkeypatch.setattr(torch.utils, "cpp_extension", None, raising=False)   # restored after
    monkeypatch.setattr(sys, "meta_path", [_NoisyCppExtension(), *sys.meta_path])
    log = logging.getLogger("torch.utils.cpp_extension")
    filters = list(log.filters)
    with caplog.at_level(logging.WARNING):
        _import_inductor_quietly()
    assert [r.getMessage() for r in caplog.records] == ["something else worth saying"]
    assert log.filters == filters


def test_compile_settings_hold_inside_the_block_only():
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    before = (fx_config.use_duck_shape, inductor_config.cpp.vec_isa_ok)
    with _compile_settings():
        assert fx_config.use_duck_shape is False and inductor_config.cpp.vec_isa_ok is True
    assert (fx_config.use_duck_shape, inductor_config.cpp.vec_isa_ok) == before


def test_penalty_grads_of_one_layer():
    """One layer (``ws[0]`` is all there is): the float64 sum of its penalty, its gradient."""
    w, lam = torch.tensor([1.5, 0.25, 0.45]), torch.tensor([1.0, 2.0, 3.0])
    grad = torch.zeros(3)
    total = penalty_grads_([w], [lam], [grad], [torch.tensor([-1.0, 0.0, 1.0])],
                           [torch.tensor(1.0)], 3.0)
    # as in the by-hand test above: cs 1.0, 0.5 and 0 (in the window), slopes 2, 2 and 0
    assert total.dtype == torch.float64 and float(total) == 1.0 * 1.0 + 2.0 * 0.5
    assert grad.tolist() == [2.0, 4.0, 0.0]
    penalty_grads_([w], [lam], [grad], [torch.tensor([-1.0, 0.0, 1.0])], [torch.tensor(1.0)],
                   3.0, clip=3.0)   # the clip reaches the layer: 4 + 4 is cut to 3
    assert grad.tolist() == [3.0, 3.0, 0.0]


def test_the_compiled_form_gets_the_clip_and_g(monkeypatch):
    """What the compiled pass is called with (torch.compile stubbed to the function itself):
    one layer, g as a tensor, the clip."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    kernel = PenaltyKernel(True)
    kernel.start_step(torch.device("cpu"))
    w, lam, grad = torch.tensor([1.5, 0.25, 0.45]), torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    total = kernel([w], [lam], [grad], [torch.tensor([-1.0, 0.0, 1.0])], [torch.tensor(1.0)],
                   3.0, clip=3.0)
    assert float(total) == 2.0 and grad.tolist() == [2.0, 3.0, 0.0]   # 4 cut to 3
    assert kernel._g_tensor(3.0, w.device) is kernel._g_tensor(3.0, w.device)   # kept
    # a new g on the same device is a new tensor: at g = 1 the window frees 0.25 as well
    assert float(kernel([w], [lam], [torch.zeros(3)], [torch.tensor([-1.0, 0.0, 1.0])],
                        [torch.tensor(1.0)], 1.0)) == 1.0
    assert kernel.failed is False
    args = ([w], [lam], [torch.zeros(3)], [torch.tensor([-1.0, 0.0, 1.0])], [torch.tensor(1.0)])
    eager = PenaltyKernel(False)
    eager(*args, 3.0, clip=1.0)
    assert args[2][0].tolist() == [1.0, 1.0, 0.0]   # the eager form clips too
    unannounced = PenaltyKernel(None)   # compiled by hand, no policy decision to amend
    unannounced._compile("one-graph", torch.device("cpu"))
    unannounced(*args, 3.0)
    assert unannounced.decision is None
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a: 1 / 0)
    broken = PenaltyKernel(True)
    broken.start_step(torch.device("cpu"))
    broken(*args, 3.0)
    assert broken.failed is True and broken.decision == "eager (compiling failed)"


def train_steps(compile_penalty: bool | None, form: str | None = None,
                scale: str = "per-layer") -> tuple[cbp.Lagrangian, dict, list[float]]:
    """Four CBP steps and two epoch ends on a small net, the penalty kernel compiled or eager
    (``form``: that compiled form from the first step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(),
                          nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 3))
    config = cbp.CBPConfig(levels="shift1", multiplier_lr=1e-2, p_max=1,
                           compile_penalty=compile_penalty, scale=scale)
    cbp.prepare(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lag = cbp.Lagrangian(model, config, optimizer)
    if form is not None:
        lag._kernel._compile(form, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    sums = []
    for _ in range(2):
        loss_sum = 0.0
        for _ in range(2):
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            lag.step()
            loss_sum += loss.detach()
        sums.append(lag.end_epoch(loss_sum).lagrangian_sum)
    return lag, {"model": model.state_dict(), **lag.state_dict()["multipliers"]}, sums


@pytest.mark.parametrize("form", ["one-graph", "per-layer"])
@pytest.mark.parametrize("scale", ["per-layer", "per-channel"])
def test_compiled_kernel_trains_like_the_eager_form(form, scale):
    """Each compiled form from the first step, against eager, with either kind of scale."""
    eager_lag, eager, eager_sums = train_steps(compile_penalty=False, scale=scale)
    compiled_lag, compiled, compiled_sums = train_steps(None, form, scale)
    assert eager_lag._kernel.compiled is None
    assert compiled_lag._kernel.compiled is not None, "torch.compile failed: eager was used"
    # slopes are exactly +-2 or 0, so the gradients and the weights agree bit for bit; the
    # penalty sums are reduced in another order
    for key in eager["model"]:
        assert torch.equal(eager["model"][key], compiled["model"][key]), key
    for key in eager:
        if key != "model":
            assert torch.equal(eager[key], compiled[key]), key
    assert compiled_sums == pytest.approx(eager_sums, rel=1e-6)


def reference_step(lag: cbp.Lagrangian) -> None:
    """``Lagrangian.step`` as it was before the clip moved into the penalty pass: penalty
    gradient, then every gradient clipped, SGD, weight clamp."""
    cfg = lag.config
    with torch.no_grad():
        for layer, lam in zip(lag.layers.values(), lag.multipliers.values()):
            if cfg.use_constraint:
                _, slope = constraint_and_grad(layer.weight, layer.levels, lag.g)
                layer.weight.grad.addcmul_(lam, slope)
        grads = [p.grad for p in lag.parameters]
        torch._foreach_clamp_min_(grads, -cfg.grad_clip_value)
        torch._foreach_clamp_max_(grads, cfg.grad_clip_value)
        lag.optimizer.step()
        weights = [layer.weight for layer in lag.layers.values()]
        torch._foreach_clamp_min_(weights, -cfg.weight_clamp)
        torch._foreach_clamp_max_(weights, cfg.weight_clamp)


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("use_constraint", [True, False], ids=["cbp", "ste"])
def test_step_with_the_clip_in_the_penalty_pass_is_bit_identical(levels, use_constraint):
    states = []
    for step in (reference_step, cbp.Lagrangian.step):
        lag, _ = setup(levels, 3.0)
        lag.config = cbp.CBPConfig(levels=levels, grad_clip_value=0.5, weight_clamp=1.0,
                                   use_constraint=use_constraint)
        lag.optimizer = torch.optim.SGD(lag.parameters, lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in lag.parameters:
                p.grad = torch.randn(p.shape, generator=gen)   # some beyond the clip
            step(lag)
        states.append([p.detach().clone() for p in lag.parameters])
    assert all(torch.equal(a, b) for a, b in zip(*states, strict=True))


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_kernel_clips_like_the_eager_form(levels):
    """The function that torch.compile fuses, run eagerly, with and without the clip: the
    penalty gradient added, then clipped, as the closed form followed by clamp_."""
    lag, weights = setup(levels, 3.0)
    for clip in (None, 0.75):
        for (layer, lam), w in zip(zip(lag.layers.values(), lag.multipliers.values()), weights):
            grad = torch.linspace(-2, 2, w.numel()).view_as(w)
            cs, slope = constraint_and_grad(w.detach(), layer.levels, 3.0)
            expected = grad + lam * slope
            if clip is not None:
                expected = expected.clamp(-clip, clip)
            total = penalty_grad_(w.detach(), lam, grad, layer.cbp_factors, layer.cbp_scale,
                                  torch.tensor(3.0), clip)
            assert torch.equal(grad, expected)
            assert float(total) == pytest.approx(float((lam * cs).sum()), rel=1e-6)
            if clip is not None:
                assert float(grad.abs().max()) == clip


@pytest.mark.parametrize("per_channel, form", [(False, "per-layer"), (True, "per-layer"),
                                               (False, "one-graph")])
def test_one_compiled_graph_for_square_and_other_weights(monkeypatch, per_channel, form):
    """Compiled dynamic, weights of one rank are one graph whether square or not: without duck
    sizing, ``(8, 8)`` does not make the two sizes one symbol, so ``(6, 10)`` after it compiles
    nothing new, nor does a second step of other sizes (the one-graph form: same layer count).
    The numbers are the eager pass's."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile   # the kernel's own settings (dynamic=...), our backend
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting}))
    torch._dynamo.reset()
    kernel = PenaltyKernel(True)
    kernel._compile(form, torch.device("cpu"))
    torch.manual_seed(0)
    for shapes in ([(8, 8), (6, 10), (12, 4), (5, 5)], [(3, 9), (7, 7), (4, 11), (10, 2)]):
        ws = [torch.randn(s) for s in shapes]
        lams = [torch.rand(s) for s in shapes]
        factors = [torch.tensor([-1.0, 0.0, 1.0])] * len(ws)
        scales = [torch.rand(s[0], 1) + 0.5 if per_channel else torch.tensor(0.7) for s in shapes]
        eager_grads = [torch.zeros(s) for s in shapes]
        expected = penalty_grads_(ws, lams, eager_grads, factors, scales, 3.0)
        grads = [torch.zeros(s) for s in shapes]
        total = kernel(ws, lams, grads, factors, scales, 3.0)
        assert torch.allclose(total, expected)
        for got, want in zip(grads, eager_grads):
            assert torch.equal(got, want)
    assert len(graphs) == 1
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config
    # the settings held for our call only: a user's own torch.compile keeps its own
    assert fx_config.use_duck_shape is True and inductor_config.cpp.vec_isa_ok is None
