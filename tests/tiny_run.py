"""A CBP run small enough to keep its checkpoints in the repository (tests/fixtures/checkpoint-v1).

The same description builds the run that wrote those files (with cbp as of the commit named in
``tests/fixtures/checkpoint-v1/make.py``) and the run that resumes them in ``test_old_checkpoints.py``;
it uses only the library API that both versions share.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import cbp
from cbp.core.distributed import Context
from cbp.training.train import Run

EPOCHS, BATCH = 6, 16
META = {"mode": "quantize", "model": "tiny-mlp", "dataset": "teacher", "num_classes": 3,
        "in_channels": 8, "constraint": "ternary", "factors": [-1.0, 0.0, 1.0]}


def data(n: int, seed: int) -> TensorDataset:
    """Inputs labelled by a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    teacher = torch.randn(8, 3, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def build(out_dir: str, rule: str, train_data=None) -> Run:
    """A 4-layer MLP (the middle two quantized to ternary), eta_lambda 1e-2, p_max 3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    config = cbp.CBPConfig(levels="ternary", multiplier_lr=1e-2, p_max=3, multiplier_rule=rule)
    cbp.prepare(model, config)
    optimizer = torch.optim.SGD(cbp.param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    return Run(model=model, optimizer=optimizer, lagrangian=cbp.Lagrangian(model, config, optimizer),
               train_data=data(64, 1) if train_data is None else train_data, val_data=data(32, 2),
               out_dir=out_dir, epochs=EPOCHS, batch_size=BATCH,
               ctx=Context(0, 1, torch.device("cpu")), meta=dict(META), show_progress=False)
