"""The 16 packaged paper configs (`--config paper/MODEL-CONSTRAINT`) hold the paper's settings
and each runs a CBP step on a tiny generated ImageFolder, without downloading anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cbp
import cbp.cli.commands
import cbp.cli.training
import cbp.training.train
from cbp.zoo.models import build_model

MODELS = ("alexnet_bn", "resnet18", "resnet50", "googlenet")
CONSTRAINTS = ("binary", "ternary", "shift1", "shift2")
NAMES = [f"{m}-{c}" for m in MODELS for c in CONSTRAINTS]
CLASSES, IMAGE_PX = ("cat", "dog"), 64
# One early block per model: the CBP work of a step scales with the number of quantized weights
# (AlexNet-BN has 58 million), far beyond a unit test on two shared CPU cores.
QUANTIZED = {"alexnet_bn": r"^features\.4$", "resnet18": r"^layer1\.", "resnet50": r"^layer1\.",
             "googlenet": r"^inception3a\."}

# Kim & Jeong 2021: Sec. 4 (eta_lambda 1e-4, p_max 20, lr drop at g = 20; GoogLeNet binary at
# g = 200), Sec. 4.1 AlexNet-BN, 4.2 ResNet-18/50, 4.3 GoogLeNet (p_max 10).
# model: (lr binary/ternary, lr shift1/shift2, weight decay, batch size, p_max)
PAPER = {"alexnet_bn": (1e-3, 1e-4, 5e-4, 256, 20), "resnet18": (1e-3, 1e-3, 1e-4, 256, 20),
         "resnet50": (1e-3, 1e-4, 1e-4, 128, 20), "googlenet": (1e-3, 1e-3, 1e-4, 256, 10)}


FACTORS = {"binary": (-1.0, 1.0), "ternary": (-1.0, 0.0, 1.0),
           "shift1": (-1.0, -0.5, 0.0, 0.5, 1.0), "shift2": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)}


def expected(name: str) -> dict:
    model, constraint = name.split("-")
    lr, shift_lr, weight_decay, batch_size, p_max = PAPER[model]
    return {"data": "imagefolder", "model": model, "levels": constraint,
            "weights": None if model == "alexnet_bn" else "torchvision:IMAGENET1K_V1",
            "lr": shift_lr if constraint.startswith("shift") else lr,
            "weight_decay": weight_decay, "batch_size": batch_size, "p_max": p_max,
            "lr_drop_at_g": 200 if name == "googlenet-binary" else 20, "multiplier_lr": 1e-4,
            "image_size": 224, "epochs": 1000}


@pytest.mark.parametrize("name", NAMES)
def test_config_holds_the_papers_settings(name):
    args = cbp.cli.commands.parse_args(["quantize", "--config", f"paper/{name}", "--out", "unused"])
    assert {key: getattr(args, key) for key in expected(name)} == expected(name)
    assert (args.stop_once_g_exceeds, args.multiplier_rule, args.momentum) == (None, "adam", 0.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny steps: with two threads on shared cores they spend most of their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ with 2 classes x 4 PNGs, val/ with 2 x 1, random 64 px RGB."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """Random-init 2-class weights per torchvision model, standing in for the published ones."""
    folder, paths = tmp_path_factory.mktemp("weights"), {}

    def path(model: str) -> str:
        if model not in paths:
            torch.manual_seed(0)
            paths[model] = str(folder / f"{model}.safetensors")
            save_file(build_model(model, len(CLASSES), 3).state_dict(), paths[model])
        return paths[model]
    return path


@pytest.mark.parametrize("name", NAMES)
def test_config_runs_one_step(name, image_folder, weights_files, tmp_path, monkeypatch):
    """One CBP step with the config's values; only sizes and the quantized layers are overridden.
    The checkpoint is captured rather than written (AlexNet-BN's would be over a gigabyte), plots
    are skipped."""
    saved, built = [], []
    monkeypatch.setattr(cbp.training.train, "save_checkpoint", lambda state, path: saved.append(state))
    init = cbp.Lagrangian.__init__

    def recording(self, *args, **kwargs):   # the CBPConfig that actually runs
        init(self, *args, **kwargs)
        built.append(self)
    monkeypatch.setattr(cbp.Lagrangian, "__init__", recording)
    monkeypatch.setattr(cbp.cli.training, "plot_run", lambda run_dir: [])
    want = expected(name)
    # AlexNet-BN's config names no weights: it starts from random ones unless --weights is given.
    weights = [] if want["weights"] is None else ["--weights", weights_files(want["model"])]
    size = "64" if want["model"] == "alexnet_bn" else "32"   # AlexNet needs >= 63 px
    cbp.cli.commands.main_or_raise([
        "quantize", "--config", f"paper/{name}", *weights, "--data-dir", str(image_folder),
        "--out", str(tmp_path), "--epochs", "1", "--epoch-iters", "1", "--batch-size", "2",
        "--image-size", size, "--include", QUANTIZED[want["model"]], "--device", "cpu",
        "--no-channels-last", "--quiet"])
    row = json.loads((tmp_path / cbp.training.train.LOG_NAME).read_text())
    assert (row["epoch"], row["steps"], row["lr"]) == (1, 1, want["lr"])
    assert (row["g"], row["updated"]) == (1, False)   # first epoch: L_sum < L_sum_pre = inf
    (state,) = saved
    assert (state["meta"]["model"], state["meta"]["levels"]) == (want["model"],
                                                                     want["levels"])
    decay_group = state["optimizer"]["param_groups"][0]
    assert (decay_group["lr"], decay_group["weight_decay"]) == (want["lr"], want["weight_decay"])
    assert state["cbp"]["ascent"]["param_groups"][0]["lr"] == want["multiplier_lr"]
    (lagrangian,) = built
    config = lagrangian.config
    assert config.factors == FACTORS[want["levels"]]
    assert (config.p_max, config.lr_drop_at_g, config.multiplier_lr) == (
        want["p_max"], want["lr_drop_at_g"], want["multiplier_lr"])
    assert (config.multiplier_rule, config.g_init, config.stop_once_g_exceeds, config.lr_drop_factor) == (
        "adam", 1.0, None, 0.1)
    assert (config.use_constraint, config.initial_multiplier_update) == (True, True)
    assert decay_group["momentum"] == 0.9
    # GoogLeNet's input scaling, which no state_dict holds, is recorded for every rebuild
    options = {"transform_input": True} if want["model"] == "googlenet" else {}
    assert state["meta"]["model_options"] == options
