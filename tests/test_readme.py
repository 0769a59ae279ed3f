"""The README's examples run as written: their code blocks are read from README.md, so the
documentation and these tests cannot drift apart."""

import glob
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import cbp

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def examples(title: str) -> list[str]:
    """The ```python blocks of the README's "## <title>" section, in order."""
    text = open(README, encoding="utf-8").read()
    section = text[text.index(f"\n## {title}\n") + 1:]
    section = section[:section.find("\n## ")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, f"README's {title} section has no python block"
    return blocks


def library_example() -> str:
    return examples("Library")[0]


def small_cnn_and_data() -> dict:
    """The names the examples take from the reader: a small 'pretrained' CNN and its loaders."""
    torch.manual_seed(0)
    pretrained_model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    return {"pretrained_model": pretrained_model, "epochs": 2,
            "loader": DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=True),
            "val_loader": DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)}


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    names = small_cnn_and_data()
    pretrained_model = names["pretrained_model"]
    monkeypatch.chdir(tmp_path)  # the example writes model.safetensors to the current folder
    exec(compile(library_example(), "README.md", "exec"), names)

    model, lagrangian = names["model"], names["lagrangian"]
    assert lagrangian.g >= 1 and names["epoch"] == 1 and names["end"].lagrangian_sum > 0
    assert os.path.getsize(tmp_path / "model.safetensors") > 0
    printed = capsys.readouterr().out
    assert f"{cbp.cfs(model)}" in printed and "total" in printed   # CFS and the summary table
    # the example's objects are what it says they are
    assert not cbp.quantized_layers(pretrained_model)                # the float model kept
    assert len(cbp.quantized_layers(model)) == 2
    assert names["same"].samples == 16
    rebuilt = cbp.load_packed(tmp_path / "model.safetensors", names["plain"])
    assert cbp.agreement(model, rebuilt, names["val_loader"]).max_logit_gap == 0.0


def test_readme_lightning_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lightning")
    lightning_example = examples("Use it from your trainer")[0]
    names = small_cnn_and_data()
    start = cbp.cfs(cbp.prepare(names["pretrained_model"], cbp.CBPConfig("ternary"), inplace=False))
    monkeypatch.chdir(tmp_path)   # the example writes model.safetensors and checkpoints/
    exec(compile(lightning_example, "README.md", "exec"), names)

    module, lagrangian = names["module"], names["callback"].optimizer.lagrangian
    assert set(lagrangian.layers) == {"net.3", "net.8"}    # the first and last layer float
    assert lagrangian.g == 300                               # 20 epochs, p_max = 1
    assert cbp.cfs(module) < start / 4, (start, cbp.cfs(module))   # 80 Adam steps of 1e-3
    assert f"g 300, CFS {cbp.cfs(module):.1e}" in capsys.readouterr().out
    rebuilt = cbp.load_packed(tmp_path / "model.safetensors",   # the module's names: net.*
                              nn.ModuleDict({"net": small_cnn_and_data()["pretrained_model"]}))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(rebuilt["net"](x), module.net.eval()(x))  # the export computes the same


def test_readme_transformers_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from cbp.zoo.text import TEXT_PATTERN, shakespeare_dir
    if not glob.glob(os.path.join(shakespeare_dir(), TEXT_PATTERN)):
        pytest.skip("Shakespeare's texts are not there: run scripts/setup.sh")
    monkeypatch.chdir(tmp_path)   # the example writes runs/llama
    names = {}
    exec(compile(examples("Use it from your trainer")[1], "README.md", "exec"), names)

    model, optimizer = names["model"], names["optimizer"]
    assert len(cbp.quantized_layers(model)) == 14 and type(model.lm_head) is nn.Linear
    assert optimizer.lagrangian.g == 80                      # 128 steps: 16 CBP epochs of 8
    loss = names["trainer"].state.log_history[-1]["train_loss"]
    assert loss < 3.0                                        # uniform over 84 characters: 4.43
    assert f"loss {loss:.3f}, g 80, CFS {cbp.cfs(model):.1e}" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "runs" / "llama" / "checkpoint-128")
