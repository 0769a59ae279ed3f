"""cbp.training.run_state: the checks of what a checkpoint holds (here, valid forms pass)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import first_scale

from cbp.files.checkpoint import CheckpointError, load_checkpoint
from cbp.training.run_state import check_run_state
from cbp.training.runs import CHECKPOINT_NAME


def test_one_scale_per_output_channel_passes_the_check(reference_run):
    """Per-channel scales ([out, 1, ...] or [out]) are a valid form of the field."""
    state = load_checkpoint(os.path.join(reference_run, CHECKPOINT_NAME))
    key = first_scale(state)
    out = state["model"][key.replace("cbp_scale", "weight")].shape[0]
    for shape in ((out, 1, 1, 1), (out,)):
        state["model"][key] = torch.full(shape, 0.25)
        check_run_state(state, "x.pt")
    state["model"][key] = torch.full((out, 1, 1, 1), 0.25).index_fill(0, torch.tensor([1]), 0)
    with pytest.raises(CheckpointError, match=f"model.{key} must be positive"):
        check_run_state(state, "x.pt")
