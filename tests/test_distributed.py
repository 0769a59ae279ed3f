"""Two processes under torchrun (gloo, CPU) train exactly what one process trains.

The library-level test launches this file itself with ``torchrun --nproc_per_node=2``: run as a
script, it trains :func:`small_net` through ``cbp.training.train.fit``, straight and with a resume, and
saves what each rank holds. The net has no BatchNorm on purpose: under DDP each process normalises
with the statistics of its own half of the batch (the usual DDP behaviour and the paper's reference
code), so a BatchNorm net is not expected to match a one-process run; the CLI test covers one.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import cbp
import cbp.training.train
from cbp.core.distributed import Context, OutOfSyncError, check_in_sync, setup, teardown
from cbp.files.checkpoint import load_checkpoint
from cbp.training.interrupts import Interrupted
from cbp.training.runs import CHECKPOINT_NAME, LOG_NAME, read_jsonl
from cbp.training.train import Run, fit

EPOCHS, BATCH, N_TRAIN, N_VAL = 3, 8, 48, 21   # 21: the two ranks evaluate 11 + 10 samples
STEPS = N_TRAIN // BATCH                        # per epoch, on each rank
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "CBP_DEBUG": "1", "OMP_NUM_THREADS": "1"}


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def dataset(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long())


def train(ctx: Context, out_dir: str, epochs: int, resume: bool = False,
          distill: bool = False) -> Run:
    """Ternary CBP with p_max 1 (g and lambda change every epoch) and large steps; ``distill``:
    distilled from the float net it starts from, the teacher run by each rank on its share."""
    torch.manual_seed(0)
    config = cbp.CBPConfig(levels="ternary", p_max=1, multiplier_lr=1e-2)
    model = small_net()
    teacher = cbp.Distillation(copy.deepcopy(model), alpha=0.5, temperature=2.0) if distill else None
    model = cbp.prepare(model, config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    run = Run(model=model, optimizer=optimizer, train_data=dataset(N_TRAIN, 1),
              val_data=dataset(N_VAL, 2), out_dir=out_dir, epochs=epochs, batch_size=BATCH,
              ctx=ctx, lagrangian=cbp.Lagrangian(model, config, optimizer), seed=3,
              show_progress=False, distillation=teacher)
    fit(run, resume=resume)
    return run


def interrupt_rank1_after(ctx: Context, steps: int) -> None:
    """SIGINT to rank 1 alone after its ``steps``-th step: the stop must reach both ranks and the
    checkpoint, written by rank 0, must still hold rank 1's share of the epoch's L_sum."""
    count, step = [0], cbp.Lagrangian.step

    def counting_step(self):
        step(self)
        count[0] += 1
        if ctx.rank == 1 and count[0] == steps:
            os.kill(os.getpid(), signal.SIGINT)
    cbp.Lagrangian.step = counting_step
    cbp.training.train.NAN_CHECK_EVERY = 1   # poll the other rank's stop flag every step


def worker(out: str) -> None:
    """One rank of the two-process run (see the module docstring)."""
    ctx = setup("cpu")
    train(ctx, os.path.join(out, "straight"), EPOCHS)
    train(ctx, os.path.join(out, "resumed"), EPOCHS - 1)
    run = train(ctx, os.path.join(out, "resumed"), EPOCHS, resume=True)
    step, poll_every = cbp.Lagrangian.step, cbp.training.train.NAN_CHECK_EVERY
    interrupt_rank1_after(ctx, STEPS + 2)
    with pytest.raises(Interrupted):
        train(ctx, os.path.join(out, "mid_epoch"), EPOCHS)
    interrupt_rank1_after(ctx, STEPS + 2)   # a second counter (the first has passed its step)
    with pytest.raises(Interrupted):
        train(ctx, os.path.join(out, "distill_mid_epoch"), EPOCHS, distill=True)
    cbp.Lagrangian.step, cbp.training.train.NAN_CHECK_EVERY = step, poll_every
    train(ctx, os.path.join(out, "mid_epoch"), EPOCHS, resume=True)
    train(ctx, os.path.join(out, "distill"), EPOCHS, distill=True)
    train(ctx, os.path.join(out, "distill_mid_epoch"), EPOCHS, resume=True, distill=True)
    held = {"model": run.model.state_dict(), "lambda": run.lagrangian.multipliers,
            "g": run.lagrangian.g, "p": run.lagrangian.p}
    torch.save(held, os.path.join(out, f"rank{ctx.rank}.pt"))
    if ctx.rank == 1:   # the debug check must notice one rank's lambda drifting
        next(iter(run.lagrangian.multipliers.values())).view(-1)[0] += 1e-3
    try:
        check_in_sync(run.model, run.optimizer, run.lagrangian)
    except OutOfSyncError as err:
        with open(os.path.join(out, f"error{ctx.rank}.txt"), "w") as f:
            f.write(str(err))
    teardown()
    # Threads the OS sees beyond Python's own: gloo's, if the process group outlived teardown
    native = len(os.listdir("/proc/self/task")) - threading.active_count()
    names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip()
                   for t in os.listdir("/proc/self/task"))
    with open(os.path.join(out, f"native_threads{ctx.rank}.txt"), "w") as f:
        f.write(f"{native} {names}")   # the names say whose threads they are where one is left


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, str]:
    """(two-process output folder, one-process run folder)."""
    out = str(tmp_path_factory.mktemp("ddp"))
    proc = subprocess.run([*TORCHRUN, __file__, out], env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, threads = os.path.join(out, "one"), torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun worker; tiny steps only wait on a second one
    try:
        train(Context(0, 1, torch.device("cpu")), one, EPOCHS)
        train(Context(0, 1, torch.device("cpu")), one + "-distill", EPOCHS, distill=True)
    finally:
        torch.set_num_threads(threads)
    return out, one


def _assert_same_run(a: dict, b: dict, rtol: float, atol: float) -> None:
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=rtol, atol=atol)
    for key in a["cbp"]["multipliers"]:
        torch.testing.assert_close(a["cbp"]["multipliers"][key], b["cbp"]["multipliers"][key],
                                   rtol=rtol, atol=atol)
    assert (a["cbp"]["g"], a["cbp"]["p"]) == (b["cbp"]["g"], b["cbp"]["p"])


def test_two_processes_match_one_process(runs):
    out, one = runs
    two = load_checkpoint(os.path.join(out, "straight", CHECKPOINT_NAME))
    ref = load_checkpoint(os.path.join(one, CHECKPOINT_NAME))
    assert ref["cbp"]["g"] == 1 + EPOCHS and two["epoch"] == EPOCHS   # g rose every epoch
    assert max(float(lam.max()) for lam in ref["cbp"]["multipliers"].values()) > 1e-3
    _assert_same_run(two, ref, rtol=1e-4, atol=1e-6)
    rows_two = read_jsonl(os.path.join(out, "straight", LOG_NAME))
    rows_one = read_jsonl(os.path.join(one, LOG_NAME))
    assert len(rows_two) == EPOCHS    # written by rank 0 only
    for r2, r1 in zip(rows_two, rows_one):
        assert r2["lagrangian_sum"] == pytest.approx(r1["lagrangian_sum"], rel=1e-5)
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["top1"] == pytest.approx(r1["top1"])   # the whole validation set, once
        assert (r2["top1"] * N_VAL / 100) == pytest.approx(round(r2["top1"] * N_VAL / 100))


def test_ranks_hold_identical_state_and_debug_check_catches_drift(runs):
    out, _ = runs
    rank0, rank1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True)
                    for r in (0, 1))
    assert (rank0["g"], rank0["p"]) == (rank1["g"], rank1["p"])
    for part in ("model", "lambda"):
        for key in rank0[part]:
            assert torch.equal(rank0[part][key], rank1[part][key]), (part, key)
    for rank in (0, 1):   # every rank raises, naming what differs and nothing else
        with open(os.path.join(out, f"error{rank}.txt")) as f:
            assert f.read() == f"rank {rank}: lambda differ between processes"


def test_teardown_frees_the_process_group_and_its_threads(runs):
    """A gloo thread alive at exit aborts Python now and then (SIGABRT, "terminate called
    without an active exception") when it releases a collective's tensors during shutdown."""
    out, _ = runs
    for rank in (0, 1):
        with open(os.path.join(out, f"native_threads{rank}.txt")) as f:
            count, names = f.read().split(" ", 1)
        assert count == "0", f"rank {rank}: {count} native threads left; all threads: {names}"


def test_resume_under_two_processes_continues_exactly(runs):
    out, _ = runs
    resumed = load_checkpoint(os.path.join(out, "resumed", CHECKPOINT_NAME))
    straight = load_checkpoint(os.path.join(out, "straight", CHECKPOINT_NAME))
    _assert_same_run(resumed, straight, rtol=0, atol=0)
    assert [r["epoch"] for r in read_jsonl(os.path.join(out, "resumed", LOG_NAME))] == [1, 2, 3]


def test_stop_mid_epoch_under_two_processes_resumes_with_every_ranks_share(runs):
    out, _ = runs
    rows = read_jsonl(os.path.join(out, "mid_epoch", LOG_NAME))
    straight = read_jsonl(os.path.join(out, "straight", LOG_NAME))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r, s in zip(rows, straight):   # epoch 2's L_sum spans the stop
        assert r["lagrangian_sum"] == pytest.approx(s["lagrangian_sum"], rel=1e-9)
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-9)
    resumed = load_checkpoint(os.path.join(out, "mid_epoch", CHECKPOINT_NAME))
    _assert_same_run(resumed, load_checkpoint(os.path.join(out, "straight", CHECKPOINT_NAME)),
                     rtol=0, atol=0)


def test_distillation_under_two_processes_matches_one_and_resumes_mid_epoch(runs):
    """Each rank distils its share of the batch; the logged terms cover every rank's share,
    also across a stop in the middle of an epoch."""
    out, one = runs
    rows_one = read_jsonl(os.path.join(one + "-distill", LOG_NAME))
    for name in ("distill", "distill_mid_epoch"):
        rows = read_jsonl(os.path.join(out, name, LOG_NAME))
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        for r2, r1 in zip(rows, rows_one):
            for key in ("loss", "task_loss"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (name, key)
            # a small KL of two close distributions: the batch split shows in the 5th digit
            assert r2["distill_loss"] == pytest.approx(r1["distill_loss"], rel=1e-3), name
            assert r2["loss"] == pytest.approx(0.5 * r2["task_loss"] + 0.5 * r2["distill_loss"])
    assert rows_one[0]["distill_loss"] > 0
    _assert_same_run(load_checkpoint(os.path.join(out, "distill_mid_epoch", CHECKPOINT_NAME)),
                     load_checkpoint(os.path.join(out, "distill", CHECKPOINT_NAME)), rtol=0, atol=0)


def test_cli_quantize_under_torchrun(tmp_path):
    """`torchrun -m cbp quantize`: a BatchNorm ResNet-20, rank 0 writes, debug check passes; with
    --checkpoint-every the processes agree to skip epoch 1's checkpoint and write epoch 2's."""
    out = tmp_path / "run"
    args = ["-m", "cbp", "quantize", "--model", "resnet20", "--data", "fashion-mnist",
            "--limit", "64", "--val-limit", "51", "--batch-size", "16", "--epochs", "2",
            "--epoch-iters", "2", "--device", "cpu", "--quiet", "--out", str(out),
            "--checkpoint-every", "3600"]
    proc = subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["steps"] == 2 for r in rows)
    for r in rows:   # accuracy counts over all 51 validation images
        assert r["top1"] * 51 / 100 == pytest.approx(round(r["top1"] * 51 / 100))
    state = load_checkpoint(str(out / CHECKPOINT_NAME))
    assert state["meta"]["levels"] == "binary" and state["epoch"] == 2
    assert (out / "curves.png").is_file()
    evaluate = ["-m", "cbp", "evaluate", str(out / CHECKPOINT_NAME), "--val-limit", "51",
                "--device", "cpu"]
    proc = subprocess.run([*TORCHRUN, *evaluate], env=ENV, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    top1 = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["top1"]]
    assert top1 == [["top1", f"{rows[-1]['top1']:.6g}"]]   # rank 0 alone prints, full set


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, capsys):
    from cbp.cli.commands import main  # here, not at the top: the torchrun workers need no CLI

    code = main(["quantize", "--model", "resnet20", "--limit", "8", "--val-limit", "8",
                 "--device", "cpu", "--sync-bn", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "cbp: error: --sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU")


if __name__ == "__main__":
    worker(sys.argv[1])
