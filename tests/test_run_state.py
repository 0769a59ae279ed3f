"""cbp.training.run_state: the checks of what a checkpoint holds.

Most cases start from a small hand-written checkpoint of a CBP run (:func:`_state`) and change one
field; a refused field is one line naming the file, the field, what it must be and what it holds.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from conftest import first_scale, set_field

from cbp.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cbp.training.run_state import check_run_state, load_run_checkpoint, today_names
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


# ---- a hand-written checkpoint, one field changed at a time ---------------------------------------

def _state() -> dict:
    """A sound checkpoint of a ternary CBP run of a ResNet-20 with one quantized conv (2 filters)."""
    meta = {"mode": "quantize", "model": "resnet20", "dataset": "fashion-mnist", "num_classes": 10,
            "in_channels": 1, "input_size": [1, 28, 28], "model_options": {},
            "levels": "ternary", "factors": [-1.0, 0.0, 1.0], "include": [], "exclude": [],
            "skip_first_last": True}
    model = {"conv.weight": torch.zeros(2, 1, 3, 3), "conv.cbp_scale": torch.tensor(0.5),
             "conv.cbp_factors": torch.tensor([-1.0, 0.0, 1.0]), "fc.weight": torch.zeros(3, 2)}
    cbp = {"multipliers": {"conv": torch.zeros(2, 1, 3, 3)}, "ascent": None, "g": 1.0, "p": 0,
           "lagrangian_sum_pre": 0.0, "lr_dropped": False, "penalty_sum": torch.zeros(())}
    return {"epoch": 1, "step": 0, "loss_sum": None, "loss_terms": None, "meta": meta,
            "model": model, "optimizer": {"state": {}, "param_groups": []}, "scheduler": None,
            "plan": None, "rng": torch.get_rng_state(), "cbp": cbp}


def _changed(changes: dict) -> dict:
    """:func:`_state` with ``changes`` (``"a.b": value``; the value ``KeyError`` removes it; after
    ``model.`` comes a tensor's whole name)."""
    state = _state()
    for field, value in changes.items():
        set_field(state, field, value, 1 if field.startswith("model.") else -1)
    return state


def _refused(changes: dict, message: str, **kwargs) -> None:
    with pytest.raises(CheckpointError) as err:
        check_run_state(_changed(changes), "x.pt", **kwargs)
    assert str(err.value) == f"checkpoint x.pt: {message}"


MODELS = "resnet20, resnet18, resnet50, googlenet, alexnet_bn, gpt, mobilenetv2_tiny"
SIZE = "a list of 1 to 4 positive integers with a product of at most 67,108,864"
CLASSES = "an integer from 1 to 100,000"
LM_TASK = "'language-model' for gpt, else 'classification'"
GPT = {"meta.model": "gpt", "meta.dataset": "shakespeare", "meta.task": "language-model",
       "meta.num_classes": 3, "meta.vocab": "abc"}
PRETRAIN = {"meta.mode": "pretrain", "cbp": None, "meta.levels": KeyError, "meta.factors": KeyError,
            "meta.include": KeyError, "meta.exclude": KeyError, "meta.skip_first_last": KeyError}

REFUSED = [   # (changes, the message after "checkpoint x.pt: ")
    ({"epoch": -1}, "epoch must be an integer >= 0, got -1"),
    ({"epoch": "1"}, "epoch must be an integer >= 0, got '1'"),
    ({"meta": KeyError}, "meta must be a table, got nothing (missing)"),
    ({"meta.mode": "train"}, "meta.mode must be 'pretrain' or 'quantize', got 'train'"),
    ({"meta.mode": "a" * 58}, f"meta.mode must be 'pretrain' or 'quantize', got '{'a' * 58}'"),
    ({"meta.mode": "a" * 59}, f"meta.mode must be 'pretrain' or 'quantize', got '{'a' * 56}..."),
    ({"meta.model": "vgg"}, f"meta.model must be one of {MODELS}, got 'vgg'"),
    ({"meta.dataset": "mnist"},
     "meta.dataset must be one of fashion-mnist, imagefolder, shakespeare, got 'mnist'"),
    ({"meta.num_classes": KeyError}, f"meta.num_classes must be {CLASSES}, got nothing (missing)"),
    ({"meta.num_classes": 0}, f"meta.num_classes must be {CLASSES}, got 0"),
    ({"meta.num_classes": 100_001}, f"meta.num_classes must be {CLASSES}, got 100001"),
    ({"meta.num_classes": True}, f"meta.num_classes must be {CLASSES}, got True"),
    ({"meta.in_channels": 0}, "meta.in_channels must be an integer from 1 to 1024, got 0"),
    ({"meta.in_channels": 1025}, "meta.in_channels must be an integer from 1 to 1024, got 1025"),
    ({"meta.in_channels": "1"}, "meta.in_channels must be an integer from 1 to 1024, got '1'"),
    ({"meta.input_size": []}, f"meta.input_size must be {SIZE}, got []"),
    ({"meta.input_size": [1] * 5}, f"meta.input_size must be {SIZE}, got [1, 1, 1, 1, 1]"),
    ({"meta.input_size": [1, 0, 28]}, f"meta.input_size must be {SIZE}, got [1, 0, 28]"),
    ({"meta.input_size": [1, 28.0]}, f"meta.input_size must be {SIZE}, got [1, 28.0]"),
    ({"meta.input_size": (1, 28, 28)}, f"meta.input_size must be {SIZE}, got (1, 28, 28)"),
    ({"meta.input_size": [64, 1024, 1025]}, f"meta.input_size must be {SIZE}, got [64, 1024, 1025]"),
    ({"meta.settings": ["lr"]}, "meta.settings must be a table of settings, got ['lr']"),
    ({"meta.model_options": {"width": [1]}},
     "meta.model_options must be a table of plain options, got {'width': [1]}"),
    ({"meta.model_options": {1: 1}}, "meta.model_options must be a table of plain options, got {1: 1}"),
    ({"meta.classes": "ab"}, "meta.classes must be a list of class names, got 'ab'"),
    ({"meta.classes": ["a", 1]}, "meta.classes must be a list of class names, got ['a', 1]"),
    ({"meta.task": "poetry"}, f"meta.task must be {LM_TASK}, got 'poetry'"),
    ({"meta.task": "language-model"}, f"meta.task must be {LM_TASK}, got 'language-model'"),
    ({k: v for k, v in GPT.items() if k != "meta.task"},
     f"meta.task must be {LM_TASK}, got nothing (missing)"),
    ({**GPT, "meta.vocab": "aab"}, "meta.vocab must be a string of distinct characters, one per "
                                   "token (meta.num_classes), got 'aab'"),
    ({**GPT, "meta.vocab": "abcd"}, "meta.vocab must be a string of distinct characters, one per "
                                    "token (meta.num_classes), got 'abcd'"),
    ({**GPT, "meta.vocab": ["a", "b", "c"]}, "meta.vocab must be a string of distinct characters, "
                                             "one per token (meta.num_classes), got ['a', 'b', 'c']"),
    ({"meta.levels": 3}, "meta.levels must be a string, got 3"),
    ({"meta.include": "conv"}, "meta.include must be a list of strings, got 'conv'"),
    ({"meta.include": [1]}, "meta.include must be a list of strings, got [1]"),
    ({"meta.exclude": KeyError}, "meta.exclude must be a list of strings, got nothing (missing)"),
    ({"meta.exclude": [None]}, "meta.exclude must be a list of strings, got [None]"),
    ({"meta.skip_first_last": 1}, "meta.skip_first_last must be true or false, got 1"),
    ({"meta.scale": "per-tensor"},
     "meta.scale must be one of per-layer, per-channel, got 'per-tensor'"),
    ({"model": [1, 2]}, "model must be a table of tensors (a state_dict), got [1, 2]"),
    ({"model": {"w": 0.0}}, "model must be a table of tensors (a state_dict), got {'w': 0.0}"),
    ({"step": -1}, "step must be an integer >= 0, got -1"),
    ({"step": 1.0}, "step must be an integer >= 0, got 1.0"),
    ({"loss_sum": 1.0}, "loss_sum must be a tensor or None, got 1.0"),
    ({"loss_terms": torch.zeros(4)}, "loss_terms must be a two-element tensor or None, got a "
                                     "torch.float32 tensor of shape (4,) ([0.0, 0.0, 0.0, 0.0])"),
    ({"loss_terms": torch.zeros(5)},
     "loss_terms must be a two-element tensor or None, got a torch.float32 tensor of shape (5,)"),
    ({"loss_terms": [1.0, 2.0]}, "loss_terms must be a two-element tensor or None, got [1.0, 2.0]"),
    ({"optimizer": {"state": {}}}, "optimizer must be an optimizer state_dict, got {'state': {}}"),
    ({"optimizer": {"param_groups": []}},
     "optimizer must be an optimizer state_dict, got {'param_groups': []}"),
    ({"optimizer": KeyError}, "optimizer must be an optimizer state_dict, got nothing (missing)"),
    ({"scheduler": []}, "scheduler must be a scheduler state_dict or None, got []"),
    ({"plan": [0]}, "plan must be a table (seed, batch size, epoch length, samples) or None, got [0]"),
    ({"cbp": None}, "cbp must be the CBP state (a table), got None"),
    ({**PRETRAIN, "cbp": []}, "cbp must be the CBP state (a table) or None, got []"),
    ({"cbp.multipliers": {"conv": 0.0}}, "cbp.multipliers must be a table of tensors, got "
                                         "{'conv': 0.0}"),
    ({"cbp.multipliers": {0: torch.zeros(1)}},
     "cbp.multipliers must be a table of tensors, got {0: tensor([0.])}"),
    ({"cbp.ascent": []}, "cbp.ascent must be an optimizer state or None, got []"),
    ({"cbp.g": 0.5}, "cbp.g must be a number >= 1, got 0.5"),
    ({"cbp.g": True}, "cbp.g must be a number >= 1, got True"),
    ({"cbp.g": KeyError}, "cbp.g must be a number >= 1, got nothing (missing)"),
    ({"cbp.p": -1}, "cbp.p must be an integer >= 0, got -1"),
    ({"cbp.p": 1.0}, "cbp.p must be an integer >= 0, got 1.0"),
    ({"cbp.lagrangian_sum_pre": "0"}, "cbp.lagrangian_sum_pre must be a number, got '0'"),
    ({"cbp.lagrangian_sum_pre": False}, "cbp.lagrangian_sum_pre must be a number, got False"),
    ({"cbp.lr_dropped": 0}, "cbp.lr_dropped must be true or false, got 0"),
    ({"cbp.penalty_sum": torch.zeros(2)}, "cbp.penalty_sum must be a one-element tensor, got a "
                                          "torch.float32 tensor of shape (2,) ([0.0, 0.0])"),
    ({"cbp.penalty_sum": 0.0}, "cbp.penalty_sum must be a one-element tensor, got 0.0"),
    ({"cbp.penalty_sum": KeyError, "cbp.epoch_sum": 0.0},   # format v1 named it epoch_sum
     "cbp.epoch_sum must be a one-element tensor, got 0.0"),
    ({"meta.factors": [1.0, -1.0]},
     "meta.factors: level factors must be strictly increasing (sorted, no duplicates), got "
     "(1.0, -1.0)"),
    ({"model.conv.cbp_scale": torch.tensor(0.0)}, "model.conv.cbp_scale must be positive and "
     "finite: one scale, or one per output channel, got a torch.float32 tensor of shape () ([0.0])"),
    ({"model.conv.cbp_scale": torch.tensor(float("inf"))}, "model.conv.cbp_scale must be positive "
     "and finite: one scale, or one per output channel, got a torch.float32 tensor of shape () "
     "([inf])"),
    ({"model.conv.cbp_scale": torch.tensor(1)}, "model.conv.cbp_scale must be positive and finite: "
     "one scale, or one per output channel, got a torch.int64 tensor of shape () ([1])"),
    ({"model.conv.cbp_scale": torch.ones(3)}, "model.conv.cbp_scale must be positive and finite: "
     "one scale, or one per output channel, got a torch.float32 tensor of shape (3,) "
     "([1.0, 1.0, 1.0])"),
    ({"model.conv.cbp_scale": torch.ones(1, 2)}, "model.conv.cbp_scale must be positive and "
     "finite: one scale, or one per output channel, got a torch.float32 tensor of shape (1, 2) "
     "([1.0, 1.0])"),
    ({"model.conv.cbp_scale": torch.tensor([0.5, -0.5])}, "model.conv.cbp_scale must be positive "
     "and finite: one scale, or one per output channel, got a torch.float32 tensor of shape (2,) "
     "([0.5, -0.5])"),
    ({"model.conv.cbp_factors": torch.tensor([-1.0, 1.0])}, "model.conv.cbp_factors must be the "
     "run's levels (meta.factors: [-1.0, 0.0, 1.0]), got a torch.float32 tensor of shape (2,) "
     "([-1.0, 1.0])"),
    ({"model.conv.cbp_factors": torch.tensor([-1.0, 0.5, 1.0])}, "model.conv.cbp_factors must be "
     "the run's levels (meta.factors: [-1.0, 0.0, 1.0]), got a torch.float32 tensor of shape (3,) "
     "([-1.0, 0.5, 1.0])"),
    # a scale without its weight is one scale
    ({"model.conv.weight": KeyError, "model.conv.cbp_scale": torch.full((2,), 0.5)},
     "model.conv.cbp_scale must be positive and finite: one scale, or one per output channel, "
     "got a torch.float32 tensor of shape (2,) ([0.5, 0.5])"),
    ({"model.cbp_scale": torch.full((2,), 0.5), "model.weight": torch.zeros(3, 2)},
     "model.cbp_scale must be positive and finite: one scale, or one per output channel, got a "
     "torch.float32 tensor of shape (2,) ([0.5, 0.5])"),
]


@pytest.mark.parametrize("changes, message", REFUSED, ids=[
    ",".join(f"{k}={v!r}"[:30] for k, v in c.items()) for c, _ in REFUSED])
def test_a_refused_field_is_one_line_naming_it_what_it_must_be_and_what_it_is(changes, message):
    _refused(changes, message)


PASSED = [   # sound variants of the fields, edges of the ranges included
    {},
    {"epoch": 0, "step": KeyError, "meta.scale": "per-channel", "meta.levels": KeyError},
    {"meta.num_classes": 1, "meta.in_channels": 1, "meta.input_size": [1]},
    {"meta.num_classes": 100_000, "meta.in_channels": 1024, "meta.input_size": [64, 1024, 1024]},
    {"meta.input_size": [1, 1, 1, 1], "meta.settings": {"lr": 0.1}, "meta.model_options": KeyError},
    {"meta.model_options": {"a": True, "b": 1, "c": 0.5, "d": "x"}},
    {"meta.classes": ["shirt", "boot"], "meta.task": "classification"},
    {"meta.include": ["conv"], "meta.exclude": ["fc"], "meta.skip_first_last": False},
    GPT,
    PRETRAIN,
    {**PRETRAIN, "model.conv.cbp_factors": torch.tensor([0.0])},   # a float run's: not checked
    {"step": 3, "loss_sum": torch.tensor(1.0), "loss_terms": torch.zeros(2), "scheduler": {},
     "plan": {"seed": 0}},
    {"cbp.ascent": {"state": {}}, "cbp.g": 1, "cbp.lagrangian_sum_pre": 3, "cbp.lr_dropped": True,
     "cbp.penalty_sum": torch.zeros(1)},
    {"cbp.penalty_sum": KeyError, "cbp.epoch_sum": torch.zeros(())},   # format v1
    {"model.conv.cbp_scale": torch.full((2, 1, 1, 1), 0.5),
     "model.conv.cbp_factors": torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64),
     "model.conv.bias": torch.full((2,), -1.0)},
    {"model.conv.cbp_scale": torch.full((1,), 0.5)},
    {"model.conv.weight": KeyError},   # a scale without its weight, or with a 0-d one: one scale
    {"model.conv.weight": torch.tensor(0.0)},
    {"model.cbp_scale": torch.full((3,), 0.5), "model.weight": torch.zeros(3, 2),
     "model.cbp_factors": torch.tensor([-1.0, 0.0, 1.0])},
]


@pytest.mark.parametrize("changes", PASSED)
def test_sound_fields_pass_and_the_state_comes_back(changes):
    state = _changed(changes)
    assert check_run_state(state, "x.pt") is state


def test_model_and_training_choose_which_fields_are_checked():
    """``model=False`` (a library run's resume) leaves ``meta`` and the tensors alone;
    ``training=False`` (evaluate, export) the optimizer, the RNG and the CBP state."""
    rng = torch.get_rng_state().numel()
    for changes in ({"meta.model": "vgg"}, {"model": None}, {"meta.factors": [1.0, -1.0]},
                    {"model.conv.cbp_scale": torch.tensor(0.0)}):
        state = _changed(changes)
        assert check_run_state(state, "x.pt", model=False) is state
    _refused({"meta": [1]}, "meta must be a table, got [1]", model=False)
    for changes in ({"step": -1}, {"optimizer": None}, {"rng": None}, {"cbp": None}):
        state = _changed(changes)
        assert check_run_state(state, "x.pt", training=False) is state
    for value in (torch.zeros(rng + 1, dtype=torch.uint8), torch.zeros(rng)):
        _refused({"rng": value}, f"rng must be a uint8 tensor of {rng} bytes, got a "
                                 f"{value.dtype} tensor of shape ({value.numel()},)")


def test_old_names_read_as_todays_without_changing_the_given_meta():
    old = {"constraint": "ternary", "settings": {"constraint": "ternary", "lr": 0.1}}
    before = copy.deepcopy(old)
    assert today_names(old) == {"levels": "ternary", "settings": {"levels": "ternary", "lr": 0.1}}
    assert old == before
    custom = {"levels": "custom", "settings": {"constraint": "custom", "levels": "-1,1"}}
    assert today_names(custom) == {"levels": "custom", "settings": {"levels": "-1,1"}}
    assert today_names({"constraint": "binary"}) == {"levels": "binary"}
    assert today_names({"constraint": "binary", "settings": ["x"]}) == {"levels": "binary",
                                                                        "settings": ["x"]}
    for meta in ({"levels": "binary", "settings": {"levels": "binary"}}, {"settings": 3}):
        assert today_names(meta) is meta


def test_load_run_checkpoint_reads_old_names_and_checks_what_it_is_asked(tmp_path):
    path = str(tmp_path / CHECKPOINT_NAME)
    state = _changed({"meta.levels": KeyError, "meta.constraint": "ternary", "step": -1})
    save_checkpoint(state, path)
    loaded = load_run_checkpoint(path, training=False)
    assert loaded["meta"]["levels"] == "ternary" and "constraint" not in loaded["meta"]
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(path)}: step must be"):
        load_run_checkpoint(path)
    save_checkpoint(_changed({"meta.model": "vgg"}), path)
    with pytest.raises(CheckpointError, match="meta.model must be one of"):
        load_run_checkpoint(path, training=False)
    assert load_run_checkpoint(path, model=False)["meta"]["model"] == "vgg"
    save_checkpoint(_changed({"meta": "x"}), path)
    with pytest.raises(CheckpointError, match="meta must be a table, got 'x'"):
        load_run_checkpoint(path, model=False, training=False)
