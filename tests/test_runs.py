"""cbp.training.runs: the files a run owns, the data-order plan of a mid-epoch resume."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import tiny_run
import torch

from cbp import prepare
from cbp.core.config import CBPConfig
from cbp.core.layers import quantized_layers
from cbp.files.checkpoint import FORMAT_V1, CheckpointError, WriteError, save_checkpoint
from cbp.training.runs import (
    CHECKPOINT_NAME,
    HIST_NAME,
    LOG_NAME,
    RUN_FILES,
    Position,
    _upgrade,
    append_row,
    check_same_plan,
    checkpoint_state,
    clear_run_dir,
    describe,
    histogram_layer,
    keep_rows_up_to,
    load_model,
    load_pretrained,
    read_jsonl,
    restore_state,
    trim_logs,
    weight_histogram,
)
from cbp.training.train import _plan
from cbp.zoo.models import build_model


def test_every_file_a_run_writes_is_one_it_owns(reference_run):
    """A finished run's directory holds exactly :data:`cbp.training.runs.RUN_FILES`: a file a run writes
    but does not own would be replaced in a user's folder without --overwrite."""
    assert set(os.listdir(reference_run)) == set(RUN_FILES)


def test_the_training_loop_itself_refuses_a_mid_epoch_resume_with_another_plan():
    """Library users call ``fit`` without the CLI's settings check."""
    plan = {"seed": 0, "batch_size": 32, "epoch_iters": None, "train_samples": 96}
    run = SimpleNamespace(seed=0, batch_size=64, epoch_iters=None, train_data=range(96))
    check_same_plan({"epoch": 1, "step": 0, "plan": plan}, _plan(run), "c")   # an epoch end: fine
    with pytest.raises(CheckpointError, match="stopped in epoch 2 after step 1.*batch_size 32 "
                                              "-> 64"):
        check_same_plan({"epoch": 1, "step": 1, "plan": plan}, _plan(run), "c")
    run.seed = 3   # two changes, each named once; the unchanged ones are not
    with pytest.raises(CheckpointError) as err:
        check_same_plan({"epoch": 0, "step": 7, "plan": plan}, _plan(run), "c")
    assert str(err.value) == ("c stopped in epoch 1 after step 7; it resumes exactly only with the "
                              "same data order, but seed 0 -> 3, batch_size 32 -> 64: resume with "
                              "the values it was started with")


# ---- the logs, a fresh start, old checkpoints, a run's identity ----------------------------------

def test_read_jsonl_leaves_out_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text('{"epoch": 1, "loss": 0.5}\n\n{"epoch": 2}\n{"epoch": 3, "lo')
    assert read_jsonl(str(path)) == [{"epoch": 1, "loss": 0.5}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\n{"epoch": 2}')   # a whole last row without its newline
    assert read_jsonl(str(path)) == [{"epoch": 1}, {"epoch": 2}]
    for line in ('{"epoch": true}', '{"epoch": 1.0}', '[1]', '{"loss": 1}', '{"epoch": 1'):
        path.write_text(f'{{"epoch": 1}}\n{line}\n{{"epoch": 3}}\n')
        with pytest.raises(ValueError) as err:
            read_jsonl(str(path))
        assert str(err.value) == (f"{path}, line 2: not a JSON object with an integer 'epoch'; "
                                  "the log is damaged")


def test_a_resume_keeps_the_rows_up_to_its_checkpoint_and_a_fresh_start_clears_the_runs_files(
        tmp_path):
    log = tmp_path / LOG_NAME
    for epoch in (1, 2, 3):
        append_row(str(log), {"epoch": epoch})
    keep_rows_up_to(str(log), 2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    keep_rows_up_to(str(tmp_path / HIST_NAME), 2)   # no file: nothing to keep
    assert not (tmp_path / HIST_NAME).exists()
    for name in (*RUN_FILES, "notes.txt", f".{CHECKPOINT_NAME}.x.cbp-tmp",
                 ".notes.txt.x.cbp-tmp"):
        (tmp_path / name).write_text("x")
    clear_run_dir(str(tmp_path), fresh=False)      # a resume: only the torn temporary goes
    assert set(os.listdir(tmp_path)) == {*RUN_FILES, "notes.txt", ".notes.txt.x.cbp-tmp"}
    clear_run_dir(str(tmp_path), fresh=True)
    assert set(os.listdir(tmp_path)) == {"notes.txt", ".notes.txt.x.cbp-tmp"}
    with pytest.raises(WriteError, match=f"^cannot append to {tmp_path}: "):
        append_row(str(tmp_path), {"epoch": 1})


def test_a_v1_checkpoint_keeps_the_penalty_alone_in_the_cbp_state():
    """v1 kept loss + penalty, averaged over processes, as ``epoch_sum``; the loss sum is over
    processes: penalty = epoch_sum - loss_sum / world_size."""
    state = {"format": FORMAT_V1, "loss_sum": torch.tensor(6.0),
             "cbp": {"epoch": 3, "epoch_sum": torch.tensor(5.0), "g": 2.0}}
    upgraded = _upgrade(state, world_size=2)
    assert upgraded["cbp"].keys() == {"g", "penalty_sum"} and upgraded["cbp"]["g"] == 2.0
    assert upgraded["cbp"]["penalty_sum"].dtype == torch.float64
    assert float(upgraded["cbp"]["penalty_sum"]) == 2.0
    assert "epoch_sum" in state["cbp"] and upgraded["loss_sum"] is state["loss_sum"]
    state = {**state, "loss_sum": None}   # at an epoch's end: all of it is penalty
    assert float(_upgrade(state, 2)["cbp"]["penalty_sum"]) == 5.0
    for kept in ({**state, "format": "cbp-checkpoint-v2"}, {**state, "cbp": None}):
        assert _upgrade(kept, 2) is kept


def test_describe_records_a_runs_identity():
    model = torch.nn.Linear(2, 2)
    assert describe("pretrain", model, "resnet20", "fashion-mnist", 10, 1, [1, 28, 28]) == {
        "mode": "pretrain", "dataset": "fashion-mnist", "num_classes": 10, "in_channels": 1,
        "input_size": [1, 28, 28], "model": "resnet20", "model_options": {}}
    config = CBPConfig(levels=[-1.0, 0.5, 1.0], include=["a"], exclude=["b"],
                       skip_first_last=False, scale="per-channel")
    meta = describe("quantize", model, "gpt", "shakespeare", 3, 1, [8], config,
                    task="language-model", vocab="abc")
    assert {k: meta[k] for k in ("task", "vocab", "levels", "factors", "include", "exclude",
                                 "skip_first_last", "scale")} == {
        "task": "language-model", "vocab": "abc", "levels": "custom", "factors": [-1.0, 0.5, 1.0],
        "include": ["a"], "exclude": ["b"], "skip_first_last": False, "scale": "per-channel"}
    meta = describe("quantize", model, "resnet20", "fashion-mnist", 10, 1, [1], CBPConfig("binary"))
    assert meta["levels"] == "binary" and "scale" not in meta and "task" not in meta


def test_a_checkpoint_of_another_run_is_refused_naming_the_key():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = checkpoint_state(Position(1), {"model": "a", "constraint": "binary"}, model, optimizer)
    with pytest.raises(CheckpointError, match=r"^c\.pt is from another run \(levels: 'binary', "
                                              r"this run: 'ternary'\)$"):
        restore_state(state, "c.pt", {"model": "a", "levels": "ternary"}, model, optimizer)
    assert restore_state(state, "c.pt", {"model": "a", "levels": "binary"}, model,
                         optimizer) == Position(1, 0, None, None)


def test_a_pretraining_runs_lr_schedule_resumes_where_it_stood():
    """The scheduler's state travels in the checkpoint: a fresh scheduler restored from it
    continues the cosine schedule from epoch 3 of 10."""
    def parts():
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return model, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model, optimizer, scheduler = parts()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = checkpoint_state(Position(3), {"model": "a"}, model, optimizer, scheduler=scheduler)
    model, optimizer, fresh = parts()
    restore_state(state, "c.pt", {"model": "a"}, model, optimizer, scheduler=fresh)
    assert fresh.last_epoch == 3 and fresh.get_last_lr() == scheduler.get_last_lr()
    fresh.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 10)) / 2)


def test_a_state_without_a_step_stands_at_its_epochs_end_and_v1_penalties_are_one_processs(
        tmp_path):
    """``step`` came with mid-epoch checkpoints; a v1 state (loss + penalty as ``epoch_sum``) is
    read as one process's unless ``world_size`` says otherwise."""
    run = tiny_run.build(str(tmp_path), "plain")
    state = checkpoint_state(Position(2), run.meta, run.model, run.optimizer, run.lagrangian)
    cbp_state = dict(state["cbp"])
    penalty = float(cbp_state["penalty_sum"])
    cbp_state["epoch_sum"] = cbp_state.pop("penalty_sum") + 5.0
    del state["step"]
    v1 = {**state, "format": FORMAT_V1, "cbp": cbp_state, "loss_sum": torch.tensor(3.0)}
    pos = restore_state(v1, "c.pt", run.meta, run.model, run.optimizer, run.lagrangian)
    assert (pos.epoch, pos.step, float(pos.loss_sum)) == (2, 0, 3.0)
    assert float(run.lagrangian.state_dict()["penalty_sum"]) == pytest.approx(penalty + 2.0)


def _resnet20_checkpoint(path, mode, tamper=False):
    """A ResNet-20 checkpoint (CBP: ternary, layer1 excluded), with a misshapen head if ``tamper``."""
    torch.manual_seed(0)
    model, config = build_model("resnet20", 10, 1), CBPConfig("ternary", exclude=[r"^layer1\."])
    if mode == "quantize":
        prepare(model, config)
    tensors = model.state_dict()
    if tamper:
        tensors["fc.weight"] = tensors["fc.weight"][:, :3]
    meta = describe(mode, model, "resnet20", "fashion-mnist", 10, 1, [1, 28, 28],
                    config if mode == "quantize" else None)
    save_checkpoint({"meta": meta, "model": tensors, "epoch": 1}, str(path))
    return model


def test_a_checkpoints_model_is_rebuilt_with_its_exclusions_and_a_misfit_names_the_file(tmp_path):
    source = _resnet20_checkpoint(tmp_path / "q.pt", "quantize")
    model, _ = load_model(str(tmp_path / "q.pt"))
    assert quantized_layers(model).keys() == quantized_layers(source).keys()
    assert not any(name.startswith("layer1.") for name in quantized_layers(model))
    for mode, load in (("quantize", load_model), ("pretrain", lambda p: load_pretrained(p, 10, 1))):
        path = str(tmp_path / f"{mode}-bad.pt")
        _resnet20_checkpoint(path, mode, tamper=True)
        with pytest.raises(CheckpointError, match=f"^checkpoint {path} does not fit its model: "):
            load(path)


def test_describe_records_the_options_a_rebuild_needs():
    model = torch.nn.Linear(2, 2)
    model.transform_input = True          # as torchvision's GoogLeNet has it
    meta = describe("pretrain", model, "googlenet", "imagefolder", 2, 3, [3, 8, 8])
    assert meta["model_options"] == {"transform_input": True}


def test_weight_histogram_counts_w_over_the_scale_in_160_bins_over_plus_minus_1_6():
    model = prepare(torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False)),
                    CBPConfig(levels="ternary", skip_first_last=False))
    layer = model[0]
    layer.cbp_scale.fill_(0.5)
    with torch.no_grad():   # w / scale: -1.57 (bin 1), 0.01 (bin 80), 0.62 (bin 111), 10 (outside)
        layer.weight.copy_(torch.tensor([[-0.785, 0.005, 0.31, 5.0]]))
    expected = [0] * 160
    expected[1] = expected[80] = expected[111] = 1
    assert weight_histogram(model, "0", epoch=3) == {
        "epoch": 3, "layer": "0", "range": 1.6, "counts": expected, "factors": [-1.0, 0.0, 1.0]}


def test_histograms_follow_the_largest_quantized_layer_whatever_its_name():
    model = prepare(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(8, 8), torch.nn.Linear(3, 3)),
                    CBPConfig(skip_first_last=False))
    assert histogram_layer(model) == "1"
    assert histogram_layer(torch.nn.Linear(2, 2)) is None


def test_trim_logs_drops_the_rows_after_the_checkpoint_from_both_logs(tmp_path):
    for name in (LOG_NAME, HIST_NAME):
        for epoch in (1, 2, 3):
            append_row(str(tmp_path / name), {"epoch": epoch})
    trim_logs(str(tmp_path), 2, torch.nn.Linear(2, 2), None, fresh=False)
    for name in (LOG_NAME, HIST_NAME):
        assert read_jsonl(str(tmp_path / name)) == [{"epoch": 1}, {"epoch": 2}], name
