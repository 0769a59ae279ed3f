"""The README's library example runs as written: its code block is read from README.md, so the
documentation and this test cannot drift apart."""

import os
import re

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import cbp

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def library_example() -> str:
    """The first ```python block of the README's "## Library" section."""
    text = open(README, encoding="utf-8").read()
    section = text[text.index("\n## Library\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's Library section has no python block"
    return match.group(1)


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    pretrained_model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    names = {"pretrained_model": pretrained_model, "epochs": 2,
             "loader": DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, shuffle=True),
             "val_loader": DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)}
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
