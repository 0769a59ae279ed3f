"""The training loop: epochs shorter or longer than one pass through the data; ``fit``'s log rows
and files, a NaN (stop, or back with a lower learning rate), a signal and the resume after it."""

import copy
import dataclasses
import itertools
import math
import os
import signal
import time

import pytest
import tiny_run
import torch
from torch.utils.data import TensorDataset

from cbp.core.distributed import Context
from cbp.core.oscillation import OscillationTracker
from cbp.files.checkpoint import CheckpointError, load_checkpoint
from cbp.training import train
from cbp.training.distill import Distillation
from cbp.training.interrupts import GracefulStop, Interrupted, poll
from cbp.training.runs import (
    CHECKPOINT_NAME,
    HIST_NAME,
    LOG_NAME,
    Position,
    histogram_layer,
    read_jsonl,
    weight_histogram,
)
from cbp.training.train import NonFiniteError, Run, fit, train_epoch
from cbp.zoo.data import epoch_batches, make_loader
from cbp.zoo.tasks import Classification


def _indices(loader, permutation: int) -> list[list[int]]:
    loader.sampler.set_epoch(permutation)
    return [x.tolist() for x, _ in loader]


def test_an_epoch_longer_than_a_pass_continues_into_fresh_passes_and_resumes_inside_them():
    data = TensorDataset(torch.arange(20), torch.zeros(20))
    loader = make_loader(data, batch_size=4, train=True, seed=3)   # 5 batches per pass
    steps = 12                                                        # 3 passes: 5 + 5 + 2

    def batches(epoch, skip=0):
        it = epoch_batches(loader, epoch, steps, skip)
        return [x.tolist() for x, _ in itertools.islice(it, steps - skip)]

    epoch1 = batches(1)
    expected = _indices(loader, 3) + _indices(loader, 4) + _indices(loader, 5)[:2]  # 1 * 3 + p
    assert epoch1 == expected and len(epoch1) == steps
    assert epoch1[:5] != epoch1[5:10]                   # each pass is a new permutation
    assert batches(1, skip=7) == epoch1[7:]            # resumed inside the second pass
    assert batches(1, skip=5) == epoch1[5:]            # resumed at a pass boundary


def test_an_epoch_of_at_most_one_pass_keeps_its_permutation():
    data = TensorDataset(torch.arange(20), torch.zeros(20))
    loader = make_loader(data, batch_size=4, train=True, seed=3)
    got = [x.tolist() for x, _ in itertools.islice(epoch_batches(loader, 2, 3, 0), 3)]
    assert got == _indices(loader, 2)[:3]
    got = [x.tolist() for x, _ in itertools.islice(epoch_batches(loader, 2, 5, 1), 4)]
    assert got == _indices(loader, 2)[1:]


# ---- fit: the log rows, the files, a NaN, a signal (the tiny CBP run of tiny_run.py) -------------

STEPS = 4   # tiny_run: 64 samples in batches of 16


def _tiny(out, epochs=2, bad_steps=(), kill_at=None, **changes):
    """``tiny_run.build`` for ``epochs`` epochs whose task keeps every step's loss; the steps
    (counted from 1) in ``bad_steps`` give a NaN loss, at ``kill_at`` the process gets SIGINT."""
    run = tiny_run.build(str(out), "plain")
    losses = []

    class Recorded(Classification):
        @staticmethod
        def loss(output, target):
            loss = Classification.loss(output, target)
            losses.append(float(loss.detach()))
            if len(losses) == kill_at:
                os.kill(os.getpid(), signal.SIGINT)
            return loss * math.nan if len(losses) in bad_steps else loss
    run.epochs, run.task = epochs, Recorded
    for key, value in changes.items():
        setattr(run, key, value)
    return run, losses


def test_fit_logs_each_epoch_and_leaves_a_checkpoint_of_the_runs_end(tmp_path):
    run, losses = _tiny(tmp_path)
    ends = []
    end_epoch = run.lagrangian.end_epoch

    def spy(loss_sum):
        ends.append((float(loss_sum), end_epoch(loss_sum)))
        return ends[-1][1]
    run.lagrangian.end_epoch = spy
    rows = fit(run)
    assert len(losses) == 2 * STEPS and [row["epoch"] for row in rows] == [1, 2]
    for row, (loss_sum, end), first in zip(rows, ends, (0, STEPS)):
        epoch_losses = losses[first:first + STEPS]
        assert row["steps"] == STEPS and row["lr"] == 0.05
        assert row["loss"] == pytest.approx(sum(epoch_losses) / STEPS)
        assert loss_sum == pytest.approx(sum(epoch_losses))   # this process's sum goes to CBP
        assert (row["lagrangian_sum"], row["g"], row["updated"], row["lr_dropped"]) == (
            end.lagrangian_sum, end.g, end.updated, end.lr_dropped)
        assert {"top1", "val_loss", "cfs", "oscillations_per_step"} <= row.keys()
        assert row["seconds"] > 0
    lams = torch.cat([lam.flatten() for lam in run.lagrangian.multipliers.values()])
    assert rows[-1]["lambda_mean"] == pytest.approx(float(lams.mean()))
    assert rows[-1]["lambda_max"] == pytest.approx(float(lams.max()))
    assert read_jsonl(str(tmp_path / LOG_NAME)) == rows
    layer = histogram_layer(run.model)
    hist = read_jsonl(str(tmp_path / HIST_NAME))
    assert [(h["epoch"], h["layer"]) for h in hist] == [(0, layer), (1, layer), (2, layer)]
    assert hist[-1] == weight_histogram(run.model, layer, 2)
    state = load_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    assert (state["epoch"], state["step"], state["loss_sum"]) == (2, 0, None)
    assert state["plan"] == {"seed": 0, "batch_size": 16, "epoch_iters": None, "train_samples": 64}
    assert state["meta"] == tiny_run.META and torch.equal(state["model"][f"{layer}.weight"],
                                                          run.model.get_submodule(layer).weight)


def test_each_epochs_end_shares_rank_0s_buffers_checks_the_state_and_evaluates_as_it_trains(
        tmp_path, monkeypatch):
    """The calls a multi-process run depends on (tested across processes in test_distributed.py,
    which mutation testing cannot see), with the debug checks on and channels-last data."""
    run, _ = _tiny(tmp_path, epochs=1, channels_last=True)
    calls = []
    monkeypatch.setattr(train.distributed, "broadcast_buffers", lambda model: calls.append(("share", model)))
    monkeypatch.setattr(train.distributed, "debug_enabled", lambda: True)
    monkeypatch.setattr(train.distributed, "check_in_sync", lambda *args: calls.append(("check", *args)))
    evaluate = run.task.evaluate

    def spy(model, data, ctx, channels_last):
        calls.append(("evaluate", model, channels_last))
        return evaluate(model, data, ctx, channels_last=channels_last)
    run.task = type("Spied", (run.task,), {"evaluate": staticmethod(spy)})
    tic = time.perf_counter()
    rows = fit(run)
    assert calls == [("share", run.model),
                     ("check", run.model, run.optimizer, run.lagrangian, run.ctx.device),
                     ("evaluate", run.model, True)]
    assert 0 < rows[0]["seconds"] < time.perf_counter() - tic


def test_fit_starts_afresh_unless_it_resumes_from_a_checkpoint(tmp_path):
    first, first_losses = _tiny(tmp_path, epochs=1)
    fit(first)
    again, losses = _tiny(tmp_path, epochs=1)
    fit(again)   # no resume asked: the earlier run's files are replaced, the epoch trained again
    assert len(losses) == len(first_losses) == STEPS
    assert [row["epoch"] for row in read_jsonl(str(tmp_path / LOG_NAME))] == [1]
    nothing_yet, losses = _tiny(tmp_path / "new", epochs=1)
    fit(nothing_yet, resume=True)   # no checkpoint to resume from: from the start
    assert len(losses) == STEPS


def test_fit_reads_this_processs_shard_of_the_runs_seeded_order(tmp_path, monkeypatch):
    run, _ = _tiny(tmp_path, seed=7, workers=2, ctx=Context(1, 2, torch.device("cpu")))
    asked = []

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        asked.append((args, kwargs))
        raise Built
    monkeypatch.setattr(train, "make_loader", spy)
    with pytest.raises(Built):
        fit(run)
    assert asked == [((run.train_data, run.batch_size),
                      {"train": True, "seed": 7, "world_size": 2, "rank": 1, "num_workers": 2})]


def test_fit_refuses_data_that_make_no_full_batch(tmp_path):
    run, _ = _tiny(tmp_path, train_data=tiny_run.data(15, 1))
    with pytest.raises(ValueError, match="^no training step: 15 training samples make no full "
                                         "batch of 16$"):
        fit(run)
    assert not os.path.exists(tmp_path / CHECKPOINT_NAME)


def test_epoch_iters_sets_the_steps_of_an_epoch(tmp_path):
    run, losses = _tiny(tmp_path, epochs=1, epoch_iters=6)
    assert fit(run)[0]["steps"] == 6 and len(losses) == 6
    # data of exactly one batch: the epoch still runs its 6 steps, passing over it 6 times
    run, losses = _tiny(tmp_path / "one", epochs=1, epoch_iters=6, train_data=tiny_run.data(16, 0))
    assert fit(run)[0]["steps"] == 6 and len(losses) == 6


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_checkpoint_kept(tmp_path):
    run, _ = _tiny(tmp_path, bad_steps=(STEPS + 2,))
    path = str(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(NonFiniteError) as err:
        fit(run)
    assert str(err.value) == (f"the loss became nan in epoch 2 at step 2; the last good "
                              f"checkpoint, {path}, is untouched")
    assert load_checkpoint(path)["epoch"] == 1
    run, _ = _tiny(tmp_path / "b", bad_steps=(1,))
    with pytest.raises(NonFiniteError, match="^the loss became nan in epoch 1 at step 1; no "
                                             "checkpoint was written$"):
        fit(run)


def test_lower_lr_goes_back_to_the_last_checkpoint_with_a_lower_learning_rate(tmp_path, capsys):
    run, losses = _tiny(tmp_path, bad_steps=(STEPS + 2,), on_nan="lower-lr")
    rows = fit(run)
    assert [row["lr"] for row in rows] == pytest.approx([0.05, 0.005])
    assert len(losses) == 2 * STEPS + 2    # epoch 2 twice, the first time 2 steps
    assert capsys.readouterr().err == ("cbp: the loss became nan in epoch 2 at step 2; going back "
                                       "to epoch 1, step 0 with the learning rate times 0.1\n")
    # always NaN: three retries from the start (kept in memory; tiny_run's meta says "constraint",
    # as a library user's may), its lr times 0.1, 0.01, 0.001
    run, losses = _tiny(tmp_path / "b", bad_steps=range(100), on_nan="lower-lr")
    with pytest.raises(NonFiniteError, match="epoch 1 at step 1; no checkpoint was written"):
        fit(run)
    assert len(losses) == 4 and run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05e-3)
    err = capsys.readouterr().err.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in err] == ["0.1", "0.01", "0.001"]
    assert all("going back to epoch 0, step 0" in line for line in err)
    # NaN before the first checkpoint, after a good step: the start kept in memory is the start as
    # it was (its first loss again), not as that step left the weights
    run, losses = _tiny(tmp_path / "c", bad_steps=(2,), on_nan="lower-lr")
    fit(run)
    assert losses[2] == losses[0] != losses[1]


def test_nan_weights_stop_the_run_at_the_epochs_end(tmp_path):
    run, losses = _tiny(tmp_path)
    step = run.lagrangian.step

    def poisoned():   # after the epoch's last step: every loss was finite
        step()
        if len(losses) == STEPS:
            with torch.no_grad():
                run.model[0].weight[0, 0] = math.inf
    run.lagrangian.step = poisoned
    with pytest.raises(NonFiniteError, match="^the weights became NaN or infinite in epoch 1; no "
                                             "checkpoint was written$"):
        fit(run)


def test_a_signal_mid_epoch_checkpoints_that_step_and_the_resume_ends_where_a_whole_run_does(
        tmp_path, signals_raise, assert_same_run):
    whole, _ = _tiny(tmp_path / "whole")
    fit(whole)
    out = tmp_path / "stopped"
    run, losses = _tiny(out, kill_at=STEPS + 2)
    with pytest.raises(Interrupted) as err:
        fit(run)
    path = str(out / CHECKPOINT_NAME)
    assert str(err.value) == (f"stopped by SIGINT in epoch 2 after step 2 of {STEPS}; {path} holds "
                              "that state: continue with --resume")
    assert err.value.exit_code == 130 and len(losses) == STEPS + 2
    state = load_checkpoint(path)
    assert (state["epoch"], state["step"], state["loss_terms"]) == (1, 2, None)   # not distilled
    assert float(state["loss_sum"]) == pytest.approx(sum(losses[STEPS:]))
    assert len(read_jsonl(str(out / LOG_NAME))) == 1
    resumed, rest = _tiny(out)
    planned, plan = [], resumed.lagrangian.plan   # the steps the compile policy is told follow
    resumed.lagrangian.plan = lambda steps: (planned.append(steps), plan(steps))
    fit(resumed, resume=True)
    assert len(rest) == STEPS - 2 and planned == [STEPS - 2]
    assert_same_run(str(out), str(tmp_path / "whole"))


def _plain_with_scheduler(out, **changes):
    """The tiny run with plain steps (as pretraining takes them) and an lr halved every epoch."""
    run, losses = _tiny(out, **changes)
    run.lagrangian, run.meta["mode"] = None, "pretrain"
    run.scheduler = torch.optim.lr_scheduler.StepLR(run.optimizer, step_size=1, gamma=0.5)
    return run, losses


def test_a_plain_run_resumed_mid_epoch_restores_its_lr_schedule_and_refuses_another_batch_size(
        tmp_path, signals_raise, assert_same_run):
    whole, _ = _plain_with_scheduler(tmp_path / "whole", epochs=3)
    fit(whole)
    out = tmp_path / "stopped"
    run, _ = _plain_with_scheduler(out, epochs=3, kill_at=STEPS + 2)
    with pytest.raises(Interrupted):
        fit(run)
    path = str(out / CHECKPOINT_NAME)
    other, _ = _plain_with_scheduler(out, epochs=3, batch_size=8)
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} stopped in epoch 2 after step 2"):
        fit(other, resume=True)
    resumed, rest = _plain_with_scheduler(out, epochs=3)
    fit(resumed, resume=True)
    assert len(rest) == 2 * STEPS - 2 and resumed.scheduler.last_epoch == 3
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"] == 0.05 / 8
    assert_same_run(str(out), str(tmp_path / "whole"))


def test_a_signal_in_an_epochs_last_step_stops_after_that_epoch(tmp_path, signals_raise):
    run, losses = _tiny(tmp_path, kill_at=STEPS)
    with pytest.raises(Interrupted) as err:
        fit(run)
    path = str(tmp_path / CHECKPOINT_NAME)
    assert str(err.value) == (f"stopped by SIGINT after epoch 1; {path} holds that state: "
                              "continue with --resume")
    assert load_checkpoint(path)["epoch"] == 1 and len(losses) == STEPS
    run, losses = _tiny(tmp_path / "b", epochs=1, kill_at=STEPS)   # the last epoch: nothing to stop
    assert len(fit(run)) == 1


def test_a_distilled_run_logs_both_terms_and_resumes_them_mid_epoch(tmp_path, signals_raise,
                                                                    assert_same_run):
    def distilled(out, **changes):
        run, losses = _tiny(out, **changes)
        parts = []
        teacher = Distillation(copy.deepcopy(run.model), alpha=0.25)

        class Kept(Distillation):   # the teacher's terms of each step, kept
            def __call__(self, x, output, task_loss):
                loss, terms = super().__call__(x, output, task_loss)
                parts.append(terms.tolist())
                return loss, terms
        teacher.__class__ = Kept
        run.distillation = teacher
        return run, losses, parts

    whole, losses, parts = distilled(tmp_path / "whole")
    rows = fit(whole)
    for row, first in zip(rows, (0, STEPS)):
        task, divergence = (sum(p[i] for p in parts[first:first + STEPS]) / STEPS for i in (0, 1))
        assert row["task_loss"] == pytest.approx(task) and row["distill_loss"] == pytest.approx(
            divergence) and divergence > 0
        assert task == pytest.approx(sum(losses[first:first + STEPS]) / STEPS)
        assert row["loss"] == pytest.approx(0.75 * task + 0.25 * divergence)
    out = tmp_path / "stopped"
    run, _, parts = distilled(out, kill_at=STEPS + 2)
    with pytest.raises(Interrupted):
        fit(run)
    terms = load_checkpoint(str(out / CHECKPOINT_NAME))["loss_terms"]
    assert terms.dtype == torch.float64
    assert terms.tolist() == pytest.approx([sum(p[i] for p in parts[STEPS:]) for i in (0, 1)])
    fit(distilled(out)[0], resume=True)
    assert_same_run(str(out), str(tmp_path / "whole"))


def test_progress_shows_steps_epochs_loss_and_headline_and_a_quiet_run_shows_nothing(
        tmp_path, capsys, signals_raise):
    """What a user watches: a bar per epoch ("epoch N", its steps, the loss every 20th step from
    the first) that leaves no line behind, one bar over the epochs with the headline metric and g,
    the penalty pass's form once it is decided; a resume's bars start where the run stopped."""
    run, losses = _tiny(tmp_path, show_progress=True)
    rows = fit(run)
    out, err = capsys.readouterr()
    for epoch in (1, 2):
        assert f"\repoch {epoch}:   0%|          | 0/{STEPS} [00:00<?, ?step/s]" in err
        after = err.split(f"\repoch {epoch}:")[-1].split("\repochs")[0]
        assert "\r" + " " * 40 in after                      # the epoch's bar is cleared away
        first = losses[(epoch - 1) * STEPS]
        assert f"?step/s, loss={first:.3f}]" in err
    assert "\repochs:   0%|          | 0/2 [00:00<?, ?epoch/s]\n" in err
    last = f"g={rows[-1]['g']:g}, top1={rows[-1]['top1']:.3f}]\n"
    assert err.endswith(last) and "| 2/2 [" in err.rsplit("\r", 1)[1]
    assert out.count("cbp: penalty pass: eager (eager pass ") == 1   # decided at step 6

    run, losses = _tiny(tmp_path / "a", epoch_iters=21, show_progress=True)
    fit(run)
    out, err = capsys.readouterr()
    shown = [float(part.split("]")[0]) for part in err.split("loss=")[1:]]   # redrawn at times
    assert [value for value, _ in itertools.groupby(shown)] == [
        round(losses[i], 3) for i in (0, 20, 21, 41)]                   # steps 1 and 21 of each
    assert out.count("cbp: penalty pass: ") == 1   # decided in epoch 1, not said again in 2

    run, losses = _tiny(tmp_path / "b", kill_at=STEPS + 2)         # stopped at epoch 2, step 2
    with pytest.raises(Interrupted):
        fit(run)
    capsys.readouterr()
    run, _ = _tiny(tmp_path / "b", show_progress=True)
    fit(run, resume=True)
    err = capsys.readouterr().err
    assert "\repoch 2:  50%|" in err and f"| 2/{STEPS} [00:00<?, ?step/s]" in err
    assert "\repochs:  50%|" in err and "| 1/2 [00:00<?, ?epoch/s]\n" in err

    run, _ = _tiny(tmp_path / "c")                                   # show_progress False
    fit(run)
    assert capsys.readouterr() == ("", "")


# ---- train_epoch on its own: the sums, the steps of a resumed epoch, what each step does --------

def _loader(run):
    return make_loader(run.train_data, run.batch_size, train=True, seed=run.seed)


def test_a_resumed_epoch_runs_only_its_remaining_steps_and_sums_in_float64_onto_the_earlier_sum(
        tmp_path):
    """epoch_iters 3 of a 4-batch pass, resumed after step 1: two steps, and the loss sum (kept in
    float64 so a resumed epoch sums exactly as a whole one) adds them to the saved sum."""
    run, losses = _tiny(tmp_path, epoch_iters=3)
    before = torch.tensor(1e8 + 0.125, dtype=torch.float64)    # float32 would round it to 1e8
    result = train_epoch(run, run.model, _loader(run), 0, Position(0, 1, before))
    assert len(losses) == 2 and result.steps == 3
    assert result.loss_sum.dtype == torch.float64 and result.own_loss_sum.dtype == torch.float64
    assert float(result.loss_sum) == pytest.approx(1e8 + 0.125 + sum(losses), rel=1e-15, abs=1e-6)
    assert result.loss == pytest.approx(float(result.loss_sum) / 3)
    assert (result.stopped_at, result.signum) == (None, 0)


def test_the_steps_step_a_separate_oscillation_tracker_once_each(tmp_path):
    run, losses = _tiny(tmp_path)
    run.lagrangian, run.oscillation = None, OscillationTracker(run.model)   # STE-style steps
    train_epoch(run, run.model, _loader(run), 0)
    assert len(losses) == STEPS and run.oscillation.steps == STEPS


class _ConvWithSpare(torch.nn.Module):
    """A conv net on 3-channel images, and a spare layer the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.conv, self.head, self.spare = (torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 3),
                                            torch.nn.Linear(2, 2))
        self.inputs = []
        self.conv.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0]))

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_channels_last_feeds_nhwc_images_and_a_parameter_outside_the_loss_is_never_moved(tmp_path):
    """With a gradient left from earlier computations, the spare layer's is set to None at the
    first step, so weight decay and momentum leave it alone (zeroing it would decay it)."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 6, 6, generator=gen), torch.randint(0, 3, (32,),
                                                                                  generator=gen))
    model = _ConvWithSpare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    run = Run(model=model, optimizer=optimizer, train_data=data, val_data=data, out_dir=str(tmp_path),
              epochs=1, batch_size=8, ctx=Context(0, 1, torch.device("cpu")), channels_last=True,
              show_progress=False)
    spare = model.spare.weight.detach().clone()
    model.spare.weight.grad = torch.ones_like(spare)
    head = model.head.weight.detach().clone()
    train_epoch(run, model, _loader(run), 0)
    assert len(model.inputs) == 4 and all(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        for x in model.inputs)
    assert torch.equal(model.spare.weight, spare) and model.spare.weight.grad is None
    assert not torch.equal(model.head.weight, head)


@pytest.fixture
def two_processes_simulated(monkeypatch):
    """train_epoch as each of two processes runs it, the collectives replaced by one process's
    values: on CPU the loss flag and a caught signal are then read every NAN_CHECK_EVERY steps."""
    monkeypatch.setattr(train, "poll", lambda stop, bad, world_size: poll(stop, bad, 1))
    monkeypatch.setattr(train, "all_reduce_sum", lambda tensor: tensor)
    return Context(0, 2, torch.device("cpu"))


def test_across_processes_a_nan_is_read_every_n_steps_and_still_names_its_first_step(
        tmp_path, two_processes_simulated):
    run, losses = _tiny(tmp_path, epoch_iters=train.NAN_CHECK_EVERY + 5, bad_steps=(1, 5),
                        ctx=two_processes_simulated)
    with pytest.raises(NonFiniteError, match=" in epoch 1 at step 1$"):
        train_epoch(run, run.model, _loader(run), 0)
    assert len(losses) == train.NAN_CHECK_EVERY


def test_across_processes_a_signal_stops_the_epoch_at_the_next_common_check(
        tmp_path, two_processes_simulated):
    run, losses = _tiny(tmp_path, epoch_iters=train.NAN_CHECK_EVERY + 5, ctx=two_processes_simulated)
    stop = GracefulStop()
    step = run.task.loss

    def caught_at_step_3(output, target):
        if len(losses) == 2:
            stop.signum = signal.SIGTERM
        return step(output, target)
    run.task = type("Caught", (Classification,), {"loss": staticmethod(caught_at_step_3)})
    result = train_epoch(run, run.model, _loader(run), 0, stop=stop)
    assert (result.stopped_at, result.signum) == (train.NAN_CHECK_EVERY, signal.SIGTERM)
    assert len(losses) == train.NAN_CHECK_EVERY


def test_across_processes_the_epochs_mean_loss_counts_every_processs_steps(
        tmp_path, two_processes_simulated, monkeypatch):
    """Two processes with the same losses (the sum over processes is twice this one's): the mean
    is this process's own, and its own sum stays its own."""
    monkeypatch.setattr(train, "all_reduce_sum", lambda tensor: 2 * tensor)
    run, losses = _tiny(tmp_path, epoch_iters=4, ctx=two_processes_simulated)
    result = train_epoch(run, run.model, _loader(run), 0)
    assert len(losses) == result.steps == 4
    assert result.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert float(result.own_loss_sum) == pytest.approx(sum(losses), rel=1e-6)
    assert float(result.loss_sum) == pytest.approx(2 * sum(losses), rel=1e-6)


def test_across_processes_fit_trains_through_ddp(tmp_path, two_processes_simulated, monkeypatch):
    """DistributedDataParallel (a stand-in here: its gradient averaging needs a group) wraps the
    model, with no device for a CPU run, and every training step goes through it."""
    built, forwards = [], []

    class Wrapped(torch.nn.Module):
        def __init__(self, module, device_ids):
            super().__init__()
            self.module = module
            built.append(device_ids)

        def forward(self, x):
            forwards.append(x.shape[0])
            return self.module(x)
    monkeypatch.setattr(train, "DistributedDataParallel", Wrapped)
    run, losses = _tiny(tmp_path, epochs=1, ctx=two_processes_simulated)
    fit(run)
    assert built == [None] and len(losses) == STEPS
    assert forwards == [8] * STEPS   # each process: half of each batch of 16


# ---- checkpoint_every: epoch-end checkpoints at most once per so many seconds --------------------

def _ticking(monkeypatch) -> list[int]:
    """``fit``'s clock (``time.monotonic``) ticks 1 s per epoch; returns the epochs it saves."""
    clock, saves = [0.0], []
    epoch, save = train.train_epoch, train._save

    def one_second_each(*args, **kwargs):
        clock[0] += 1.0
        return epoch(*args, **kwargs)

    def recorded(run, pos, path):
        saves.append(pos.epoch)
        save(run, pos, path)
    monkeypatch.setattr(train, "train_epoch", one_second_each)
    monkeypatch.setattr(train, "_save", recorded)
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    return saves


@pytest.mark.parametrize("every, saved", [(0.0, [1, 2, 3, 4, 5]), (2.5, [3, 5]), (3600, [5])])
def test_checkpoint_every_writes_an_epochs_end_once_that_long_has_passed(
        tmp_path, monkeypatch, every, saved):
    """Epochs of 1 s: with 2.5 s the ends of epochs 3 (3 s after the start) and 5 (the last,
    always); every epoch is logged whichever are saved."""
    saves = _ticking(monkeypatch)
    run, _ = _tiny(tmp_path, epochs=5, checkpoint_every=every)
    rows = fit(run)
    assert saves == saved and load_checkpoint(str(tmp_path / CHECKPOINT_NAME))["epoch"] == 5
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in read_jsonl(str(tmp_path / LOG_NAME))] \
        == [1, 2, 3, 4, 5]


def test_a_signal_at_an_epochs_end_writes_the_checkpoint_checkpoint_every_skipped(
        tmp_path, signals_raise):
    run, losses = _tiny(tmp_path, epochs=3, kill_at=STEPS, checkpoint_every=3600)
    with pytest.raises(Interrupted, match="after epoch 1"):
        fit(run)
    assert load_checkpoint(str(tmp_path / CHECKPOINT_NAME))["epoch"] == 1


def test_a_nan_retry_behind_skipped_checkpoints_logs_each_epoch_once(tmp_path, capsys):
    """NaN in epoch 3 and no checkpoint yet (checkpoint_every): back to the start, the rows of
    epochs 1 and 2 dropped before they are logged again."""
    run, losses = _tiny(tmp_path, epochs=3, bad_steps=(2 * STEPS + 2,), on_nan="lower-lr",
                        checkpoint_every=3600)
    rows = fit(run)
    assert "going back to epoch 0, step 0" in capsys.readouterr().err
    assert len(losses) == 2 * STEPS + 2 + 3 * STEPS
    assert [r["epoch"] for r in read_jsonl(str(tmp_path / LOG_NAME))] == [1, 2, 3]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [h["epoch"] for h in read_jsonl(str(tmp_path / HIST_NAME))] == [0, 1, 2, 3]


def test_a_run_the_cbp_schedule_ends_early_saves_its_end_whatever_checkpoint_every(
        tmp_path, monkeypatch):
    saves = _ticking(monkeypatch)
    run, _ = _tiny(tmp_path, epochs=5, checkpoint_every=3600)
    end_epoch = run.lagrangian.end_epoch

    def g_past_the_stop_after_epoch_1(loss_sum):   # the schedule ends with epoch 1
        result = end_epoch(loss_sum)
        run.lagrangian.config = dataclasses.replace(run.lagrangian.config, stop_once_g_exceeds=1)
        run.lagrangian.g = 2.0
        return result
    run.lagrangian.end_epoch = g_past_the_stop_after_epoch_1
    assert [r["epoch"] for r in fit(run)] == [1] and saves == [1]


def test_every_process_saves_when_rank_0s_clock_says_so(tmp_path, monkeypatch):
    run, _ = _tiny(tmp_path, checkpoint_every=0, ctx=Context(1, 2, torch.device("cpu")))
    assert train._checkpoint_due(run, last_epoch=False, since=0)   # 0: every epoch, no vote
    run.checkpoint_every = 10
    assert not train._checkpoint_due(run, last_epoch=False, since=11)   # rank 1's clock alone
    assert train._checkpoint_due(run, last_epoch=True, since=0)
    monkeypatch.setattr(train, "all_reduce_sum", lambda due: due + 1)   # rank 0 says "due"
    assert train._checkpoint_due(run, last_epoch=False, since=0)
    run.ctx = Context(0, 2, torch.device("cpu"))
    monkeypatch.setattr(train, "all_reduce_sum", lambda due: due)
    assert train._checkpoint_due(run, last_epoch=False, since=10)
    assert not train._checkpoint_due(run, last_epoch=False, since=9.9)
