"""End to end through ``cbp.cli.commands.main`` on a tiny Fashion-MNIST (issue 3): pretrain, quantize with a
TOML config, evaluate, export and plot; and an interrupted run resumed to the bit."""

from __future__ import annotations

import json
import math
import os
import struct

import matplotlib.image
import pytest
import torch
from conftest import REFERENCE_EPOCHS, one_thread

import cbp
from cbp.cli import commands as cli
from cbp.core.distributed import Context
from cbp.core.layers import convert, quantized_layers
from cbp.files.checkpoint import load_checkpoint
from cbp.files.export_read import read_packed
from cbp.training.runs import CHECKPOINT_NAME, HIST_NAME, LOG_NAME, load_model, read_jsonl
from cbp.training.train import evaluate
from cbp.zoo.data import load_dataset, make_loader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ETA_LAMBDA = 1e-2


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def assert_picture(path: str) -> None:
    """A decodable PNG of a real figure: signature, IHDR size, not one flat colour."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 300 and height >= 200
    assert os.path.getsize(path) > 10_000
    assert matplotlib.image.imread(path).std() > 0.01


def test_pretrain_row_and_checkpoint(pretrained):
    run_dir = os.path.dirname(pretrained)
    (row,) = read_jsonl(os.path.join(run_dir, LOG_NAME))
    assert set(row) == {"epoch", "loss", "steps", "lr", "top1", "top5", "val_loss", "seconds"}
    assert (row["epoch"], row["steps"], row["lr"]) == (1, 256 // 32, 0.1)
    assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["seconds"] > 0
    assert 0 <= row["top1"] <= row["top5"] <= 100
    state = load_checkpoint(pretrained)
    assert (state["epoch"], state["step"], state["meta"]["mode"]) == (1, 0, "pretrain")
    assert_picture(os.path.join(run_dir, "curves.png"))


def write_config(path, **values) -> str:
    lines = ["[quantize]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_config_sets_values_and_flags_win(tmp_path):
    config = write_config(tmp_path / "c.toml", p_max=3, multiplier_lr=0.5, exclude=["layer3"],
                          channels_last=False, no_constraint=True, levels="-1,0,1",
                          constraint="custom")
    args = cli.parse_args(["quantize", "--config", config, "--out", "o", "--p-max", "7"])
    assert (args.p_max, args.multiplier_lr, args.exclude) == (7, 0.5, ["layer3"])
    assert (args.channels_last, not args.use_constraint, args.levels) == (False, True, "-1,0,1")
    assert cli.parse_args(["quantize", "--config", config, "--out", "o",
                           "--channels-last", "--exclude"]).channels_last is True
    assert cli.parse_args(["quantize", "--config", config, "--out", "o",
                           "--exclude"]).exclude == []


def quantized_weights(checkpoint: str) -> list[torch.Tensor]:
    """The weights CBP quantizes by default (every Conv/Linear but the first and last)."""
    model, _ = load_model(checkpoint)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [m.weight.detach().double() for m in layers[1:-1]]


def cfs_by_hand(model) -> tuple[float, float]:
    """Paper Eq. 19 - twice the distance to the nearest level, averaged over all quantized
    weights - and the fraction within 1% of the scale of a level."""
    y, on, count = 0.0, 0, 0
    for layer in quantized_layers(model).values():
        w = layer.weight.detach().double().flatten()
        scale = float(layer.cbp_scale)
        distance = (w[:, None] - layer.cbp_factors.double() * scale).abs().min(dim=1).values
        y, on, count = y + 2 * float(distance.sum()), on + int((distance <= 0.01 * scale).sum()), \
            count + w.numel()
    return y / count, on / count


def test_quantize_evaluate_export_plot(pretrained, tiny_fashion, tmp_path, capsys):
    """Pretrained checkpoint -> 2 CBP epochs -> evaluate, export, plot; values in range."""
    # The config asks for 5 epochs of 64-image batches; the command line wins with 2 of 32.
    config = write_config(tmp_path / "run.toml", epochs=5, batch_size=64, limit=64,
                          multiplier_lr=ETA_LAMBDA, p_max=1, val_limit=64, constraint="binary")
    out = str(tmp_path / "binary")
    assert cli.main(["quantize", "--config", config, "--from", pretrained, "--data-dir",
                     tiny_fashion, "--epochs", "2", "--batch-size", "32", "--out", out,
                     "--quiet"]) == 0

    rows = read_jsonl(os.path.join(out, LOG_NAME))
    assert [r["epoch"] for r in rows] == [1, 2] and {r["steps"] for r in rows} == {64 // 32}
    for epoch, row in enumerate(rows, start=1):
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        # L = CE + sum(lambda * cs) at every step, summed over the epoch's 2 steps
        assert row["lagrangian_sum"] > row["loss"] * row["steps"]
        assert row["g"] == 1 + epoch                      # p_max = 1: g += 1 every epoch
        # Adam moves lambda by about eta per update: one at start, one per epoch end.
        assert 0 <= row["lambda_mean"] <= row["lambda_max"]
        assert epoch * ETA_LAMBDA < row["lambda_max"] <= (epoch + 1) * ETA_LAMBDA * 1.01
        assert 0 < row["cfs"] < 1 and 0 <= row["on_levels"] <= 1
        assert row["lr"] == 1e-3                          # the paper's lr; no drop before g = 20
        assert 0 <= row["top1"] <= row["top5"] <= 100 and row["seconds"] > 0
    # Epoch 1 by hand: Adam's first step set lambda = eta wherever cs(w; g=1) > 0, i.e. on the
    # outer arms |w| > a; two steps of lr 1e-3 hardly move the weights, so each step adds about
    # the penalty of the pretrained weights, sum(eta * 2 (|w| - a)) over those (0.03% apart here).
    penalty = sum(ETA_LAMBDA * 2 * float((w.abs() - w.abs().mean()).clamp(min=0).sum())
                  for w in quantized_weights(pretrained))
    assert rows[0]["lagrangian_sum"] == pytest.approx(rows[0]["loss"] * 2 + 2 * penalty, rel=2e-3)
    hists = read_jsonl(os.path.join(out, HIST_NAME))
    assert [h["epoch"] for h in hists] == [0, 1, 2]

    ckpt = os.path.join(out, CHECKPOINT_NAME)
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["meta"]["levels"], state["cbp"]["g"]) == (2, "binary", 3.0)
    model, _ = load_model(ckpt)
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # CFS and the on-level fraction of the last epoch, recomputed from the checkpoint's weights
    cfs, on_levels = cfs_by_hand(model)
    assert rows[-1]["cfs"] == pytest.approx(cfs, rel=1e-5)
    assert rows[-1]["on_levels"] == pytest.approx(on_levels, abs=1e-4)
    for name in ("curves.png", "histograms.png"):
        assert_picture(os.path.join(out, name))

    capsys.readouterr()
    assert cli.main(["evaluate", ckpt, "--data-dir", tiny_fashion, "--val-limit", "64"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert abs(float(printed["top1"]) - rows[-1]["top1"]) <= 100 / 64   # one image at most
    assert float(printed["cfs"]) == pytest.approx(rows[-1]["cfs"], rel=1e-4)

    packed = str(tmp_path / "binary.safetensors")
    assert cli.main(["export", ckpt, packed]) == 0
    assert os.path.getsize(packed) < os.path.getsize(ckpt) / 10
    snapped = convert(model).state_dict()   # weights on their levels, cbp buffers dropped
    unpacked = read_packed(packed)
    assert unpacked.keys() == snapped.keys()
    assert all(torch.equal(unpacked[k], snapped[k]) for k in snapped)

    os.unlink(os.path.join(out, "curves.png"))
    assert cli.main(["plot", out]) == 0
    assert_picture(os.path.join(out, "curves.png"))


def test_resume_after_a_stop_is_bit_identical(quantize_argv, reference_run, assert_same_run,
                                             tmp_path):
    """k epochs, then ``--resume`` to N: the same weights, lambda, optimizer state and log."""
    out = str(tmp_path / "resumed")
    assert cli.main(quantize_argv(out, 1)) == 0
    assert len(read_jsonl(os.path.join(out, LOG_NAME))) == 1
    assert cli.main(quantize_argv(out, REFERENCE_EPOCHS, "--resume")) == 0
    assert_same_run(out, reference_run)


def test_demo_prints_the_table_and_caches_pretraining(tiny_fashion, tmp_path, capsys):
    # on the CPU, as the re-evaluation below: a GPU's top-1 may differ by an image
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
[pretrain]
data_dir = "{tiny_fashion}"
epochs = 1
batch_size = 32
device = "cpu"
[quantize]
data_dir = "{tiny_fashion}"
device = "cpu"
limit = 96
val_limit = 32
batch_size = 32
epochs = 2
multiplier_lr = 1e-2
p_max = 1
""")
    out = str(tmp_path / "demo")
    with one_thread():
        assert cli.main(["demo", "--config", str(config), "--out", out, "--quiet"]) == 0
        first = capsys.readouterr().out
        assert cli.main(["demo", "--config", str(config), "--out", out, "--quiet"]) == 0
        second = capsys.readouterr().out
    assert "pretrained model found" not in first and "pretrained model found" in second
    table = {key.strip(): value.strip() for key, value in
             (line.rsplit("  ", 1) for line in first.splitlines() if "  " in line)}
    model, _ = load_model(os.path.join(out, "binary", CHECKPOINT_NAME))
    test_data, _, _ = load_dataset("fashion-mnist", tiny_fashion, False)
    full = evaluate(model, test_data, Context(0, 1, torch.device("cpu")))
    # the table's top-1 is the whole (here 128-image) test set, not the 32-image monitor
    assert float(table["CBP binary top-1 (%), training BN statistics"]) == pytest.approx(
        full["top1"], abs=5e-3)
    # and after re-estimating BN on the 2 batches of 128 the 256 training images give
    train_data, _, _ = load_dataset("fashion-mnist", tiny_fashion, True)
    cbp.recalibrate_bn(model, make_loader(train_data, 128, train=True, seed=0), 2)
    after = evaluate(model, test_data, Context(0, 1, torch.device("cpu")))
    assert float(table["CBP binary top-1 (%), BN re-estimated (2 batches of 128)"]) == \
        pytest.approx(after["top1"], abs=5e-3)
    assert table["final g / CBP epochs"].endswith("/ 2")
    assert os.path.isfile(os.path.join(out, "binary", "curves.png"))


def test_ste_with_freezing_and_bn_recalibration_from_the_cli(quantize_argv, tiny_fashion,
                                                             tmp_path, capsys):
    """STE-only + iterative freezing on CBP's clock, BN re-estimated at the end, then evaluated."""
    out = str(tmp_path / "freeze")
    capsys.readouterr()
    assert cli.main(quantize_argv(out, 3, "--no-constraint", "--oscillation-fix", "freeze",
                                  "--lr-drop-at-g", "3", "--recalibrate-bn", "2")) == 0
    printed = capsys.readouterr().out
    rows = read_jsonl(os.path.join(out, LOG_NAME))
    assert [r["g"] for r in rows] == [2, 3, 4]              # the clock runs without the constraint
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, pytest.approx(1e-4)]
    for row in rows:
        assert row["flips_per_step"] >= row["oscillations_per_step"] >= 0
        assert 0 <= row["late_flippers"] <= 1 and 0 <= row["level_changes"] <= 1
        assert 0 <= row["frozen"] <= 1 and "lambda_mean" not in row
    last = rows[-1]
    assert last["bn_gap"] == pytest.approx(last["top1_recalibrated"] - last["top1"])
    assert f"{last['top1_recalibrated']:.2f}% after re-estimating them on 2 batches" in printed
    assert_picture(os.path.join(out, "oscillations.png"))
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    assert load_checkpoint(ckpt)["meta"]["bn_recalibrated"] == 2
    # the checkpoint holds the re-estimated statistics: evaluating it gives the logged top-1
    assert cli.main(["evaluate", ckpt, "--data-dir", tiny_fashion, "--val-limit", "64",
                     "--recalibrate-bn", "2", "--batch-size", "32"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert abs(float(printed["top1"]) - last["top1_recalibrated"]) <= 100 / 64
    assert float(printed["bn_gap"]) == pytest.approx(
        float(printed["top1_recalibrated"]) - float(printed["top1"]), abs=1e-3)


def test_recalibration_asking_for_more_batches_than_the_data_fails_before_training(
        quantize_argv, tmp_path, capsys):
    out = str(tmp_path / "too-many")
    assert cli.main(quantize_argv(out, 1, "--recalibrate-bn", "4")) == 2   # 96 images: 3 batches
    assert "--recalibrate-bn 4: the training set gives only 3 batches" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, CHECKPOINT_NAME))
