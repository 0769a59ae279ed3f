"""What a run's checkpoint must hold, checked field by field before anything is built from it.

``load_checkpoint`` proves a file is whole and plain data; this proves the data makes sense. A
field that is missing, of the wrong type or absurd (a 2e9-class model, a huge input size, a
random-number state of the wrong size) is a one-line :class:`CheckpointError` naming the file and
the field - before a model is built from it or memory is allocated for it.
"""

from __future__ import annotations

import math

import torch

from ..core.levels import SCALES, resolve_factors
from ..files.checkpoint import CheckpointError, load_checkpoint
from ..zoo.data import DATASET_NAMES
from ..zoo.models import LANGUAGE_MODELS, MODEL_NAMES
from ..zoo.tasks import TASKS, Classification, LanguageModel, task_of

# Bounds far above any real model, far below what would exhaust a machine's memory.
MAX_CLASSES = 100_000            # ImageNet-21k has 21,841
MAX_IN_CHANNELS = 1024
MAX_INPUT_ELEMENTS = 1 << 26     # one sample: 3 x 4096 x 4096 fits; 256 MB of float32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _meta_checks(meta: dict) -> list[tuple[str, bool, str]]:
    size = meta.get("input_size")
    sizes_ok = (isinstance(size, list) and 1 <= len(size) <= 4
                and all(_is_int(d) and d >= 1 for d in size)
                and math.prod(size) <= MAX_INPUT_ELEMENTS)
    checks = [
        ("meta.mode", meta.get("mode") in ("pretrain", "quantize"), "'pretrain' or 'quantize'"),
        ("meta.model", meta.get("model") in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}"),
        ("meta.dataset", meta.get("dataset") in DATASET_NAMES, f"one of {', '.join(DATASET_NAMES)}"),
        ("meta.num_classes", _is_int(meta.get("num_classes"))
         and 1 <= meta["num_classes"] <= MAX_CLASSES, f"an integer from 1 to {MAX_CLASSES:,}"),
        ("meta.in_channels", _is_int(meta.get("in_channels"))
         and 1 <= meta["in_channels"] <= MAX_IN_CHANNELS,
         f"an integer from 1 to {MAX_IN_CHANNELS}"),
        ("meta.input_size", sizes_ok,
         f"a list of 1 to 4 positive integers with a product of at most {MAX_INPUT_ELEMENTS:,}"),
        ("meta.settings", isinstance(meta.get("settings", {}), dict), "a table of settings"),
        ("meta.model_options", isinstance(meta.get("model_options", {}), dict) and all(
            isinstance(k, str) and isinstance(v, (bool, int, float, str))
            for k, v in meta.get("model_options", {}).items()), "a table of plain options"),
        ("meta.classes", meta.get("classes") is None or (isinstance(meta["classes"], list) and all(
            isinstance(c, str) for c in meta["classes"])), "a list of class names"),
        ("meta.task", meta.get("task", "classification") in TASKS
         and TASKS[meta.get("task", Classification.name)] is task_of({"model": meta.get("model")}),
         f"{LanguageModel.name!r} for {', '.join(LANGUAGE_MODELS)}, else 'classification'"),
    ]
    if meta.get("task") in TASKS and task_of(meta) is LanguageModel:
        vocab = meta.get("vocab")
        checks.append(("meta.vocab", isinstance(vocab, str) and len(set(vocab)) == len(vocab)
                       == meta.get("num_classes"),
                       "a string of distinct characters, one per token (meta.num_classes)"))
    if meta.get("mode") == "quantize":
        checks += [
            ("meta.levels", isinstance(meta.get("levels", ""), str), "a string"),
            ("meta.include", isinstance(meta.get("include"), list)
             and all(isinstance(p, str) for p in meta["include"]), "a list of strings"),
            ("meta.exclude", isinstance(meta.get("exclude"), list)
             and all(isinstance(p, str) for p in meta["exclude"]), "a list of strings"),
            ("meta.skip_first_last", isinstance(meta.get("skip_first_last"), bool), "true or false"),
            ("meta.scale", meta.get("scale", SCALES[0]) in SCALES, f"one of {', '.join(SCALES)}"),
        ]
    return checks


def _cbp_checks(cbp: dict) -> list[tuple[str, bool, str]]:
    running = "epoch_sum" if "epoch_sum" in cbp else "penalty_sum"   # format v1 / v2
    return [
        ("cbp.multipliers", _tensor_dict(cbp.get("multipliers")), "a table of tensors"),
        ("cbp.ascent", cbp.get("ascent") is None or isinstance(cbp["ascent"], dict),
         "an optimizer state or None"),
        ("cbp.g", _is_number(cbp.get("g")) and cbp["g"] >= 1, "a number >= 1"),
        ("cbp.p", _is_int(cbp.get("p")) and cbp["p"] >= 0, "an integer >= 0"),
        ("cbp.lagrangian_sum_pre", _is_number(cbp.get("lagrangian_sum_pre")), "a number"),
        ("cbp.lr_dropped", isinstance(cbp.get("lr_dropped"), bool), "true or false"),
        (f"cbp.{running}", isinstance(cbp.get(running), torch.Tensor)
         and cbp[running].numel() == 1, "a one-element tensor"),
    ]


def check_run_state(state: dict, path: str, model: bool = True, training: bool = True) -> dict:
    """Return ``state`` if every field read from it is sound, else raise naming the field.

    ``model``: the fields a model is rebuilt from (``meta``, ``model``, ``epoch``: what
    ``evaluate``, ``export`` and ``quantize --from`` read); ``training``: the rest of what a
    resumed run reads (position, optimizer, scheduler, RNG, CBP state). A library run's ``meta``
    is whatever its caller put there, so its resume checks ``training`` alone.
    """
    rng_size = torch.get_rng_state().numel()
    meta = state.get("meta")
    quantize = isinstance(meta, dict) and meta.get("mode") == "quantize"
    cbp = state.get("cbp")
    checks = [
        ("epoch", _is_int(state.get("epoch")) and state["epoch"] >= 0, "an integer >= 0"),
        ("meta", isinstance(meta, dict), "a table"),
    ]
    if model:
        checks += [
            *(_meta_checks(meta) if isinstance(meta, dict) else []),
            ("model", _tensor_dict(state.get("model")), "a table of tensors (a state_dict)"),
        ]
    if training:
        checks += [
            ("step", _is_int(state.get("step", 0)) and state.get("step", 0) >= 0,
             "an integer >= 0"),
            ("loss_sum", state.get("loss_sum") is None
             or isinstance(state["loss_sum"], torch.Tensor), "a tensor or None"),
            ("loss_terms", state.get("loss_terms") is None
             or (isinstance(state["loss_terms"], torch.Tensor) and state["loss_terms"].numel() == 2),
             "a two-element tensor or None"),
            ("optimizer", isinstance(state.get("optimizer"), dict)
             and {"state", "param_groups"} <= set(state["optimizer"]), "an optimizer state_dict"),
            ("scheduler", state.get("scheduler") is None or isinstance(state["scheduler"], dict),
             "a scheduler state_dict or None"),
            ("plan", state.get("plan") is None or isinstance(state["plan"], dict),
             "a table (seed, batch size, epoch length, samples) or None"),
            ("rng", isinstance(state.get("rng"), torch.Tensor)
             and state["rng"].dtype == torch.uint8 and state["rng"].numel() == rng_size,
             f"a uint8 tensor of {rng_size} bytes"),
            ("cbp", isinstance(cbp, dict) or (cbp is None and not quantize),
             "the CBP state (a table)" + ("" if quantize else " or None")),
            *(_cbp_checks(cbp) if isinstance(cbp, dict) else []),
        ]
    for field, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"checkpoint {path}: {field} must be {expected}, "
                                  f"got {_short(_get(state, field))}")
    if model and quantize:
        try:
            factors = resolve_factors(meta.get("factors"))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: meta.factors: {err}") from None
        _check_layers(state["model"], factors, path)
    return state


def _check_layers(tensors: dict[str, torch.Tensor], factors, path: str) -> None:
    """Every quantized layer's scale positive and finite - one for the layer or one per output
    channel (shaped ``[out, 1, ...]``) - and its factors the run's levels (``meta.factors``): a
    zero or NaN scale would divide every metric by zero and export a zero model."""
    expected = torch.tensor(factors, dtype=torch.float32)
    for key, value in tensors.items():
        prefix, _, buffer = key.rpartition(".")
        weight = tensors.get(f"{prefix}.weight" if prefix else "weight")
        if buffer == "cbp_scale":
            channels = weight.shape[0] if weight is not None and weight.dim() else 1
            ok = (value.is_floating_point() and value.numel() in (1, channels)
                  and (value.numel() == 1 or value.shape[0] == channels)
                  and bool(value.isfinite().all()) and bool((value > 0).all()))
            wanted = "positive and finite: one scale, or one per output channel"
        elif buffer == "cbp_factors":
            ok = value.shape == expected.shape and torch.equal(value.float(), expected)
            wanted = f"the run's levels (meta.factors: {list(factors)})"
        else:
            continue
        if not ok:
            raise CheckpointError(f"checkpoint {path}: model.{key} must be {wanted}, "
                                  f"got {_short(value)}")


_MISSING = object()


def _get(state: dict, field: str):
    value = state
    for part in field.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def _short(value) -> str:
    """A value as a few characters (a tensor by its shape and dtype)."""
    if isinstance(value, torch.Tensor):
        values = f" ({value.flatten().tolist()})" if value.numel() <= 4 else ""
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{values}"
    if value is _MISSING:
        return "nothing (missing)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def today_names(meta: dict) -> dict:
    """``meta`` in today's names: ``levels``, the level set, was ``constraint`` (and in the
    recorded settings ``--constraint NAME`` is ``--levels NAME``; ``--constraint custom`` kept its
    factors in ``--levels``)."""
    settings = meta.get("settings")
    old_settings = isinstance(settings, dict) and "constraint" in settings
    if "constraint" not in meta and not old_settings:
        return meta
    meta = dict(meta)
    if "constraint" in meta:
        meta["levels"] = meta.pop("constraint")
    if old_settings:
        settings = dict(settings)
        constraint = settings.pop("constraint")
        if constraint != "custom":
            settings["levels"] = constraint
        meta["settings"] = settings
    return meta


def load_run_checkpoint(path: str, model: bool = True, training: bool = True) -> dict:
    """:func:`load_checkpoint` (``meta`` in today's names), then :func:`check_run_state`."""
    state = load_checkpoint(path)
    if isinstance(state.get("meta"), dict):
        state["meta"] = today_names(state["meta"])
    return check_run_state(state, path, model, training)
