"""cbp.training.runs: the files a run owns, the data-order plan of a mid-epoch resume."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from cbp.files.checkpoint import CheckpointError
from cbp.training.runs import RUN_FILES, check_same_plan
from cbp.training.train import _plan


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
