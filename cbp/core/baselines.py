"""Post-training rounding: the no-training baseline every low-bit method has to beat.

Rounding each weight of a trained network to its nearest level with ``a = mean|W|`` (BWN/TWN
style) is exactly what a prepared model computes before any fine-tuning, so
``post_training_rounding`` is :func:`cbp.prepare` plus one repair: the BatchNorm running
statistics were measured on full-precision activations and are wrong for the rounded weights (a
ResNet-20 on Fashion-MNIST rounded to binary or ternary drops to chance without it). Re-estimating
them on a few training batches, with no gradient step, recovers most of the loss.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from .config import CBPConfig
from .layers import prepare

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NO_BATCH_NORM = ("the model has no BatchNorm layer with running statistics to re-estimate (a "
                 "model with LayerNorm or no normalisation needs none)")


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]


def require_batch_norm(model: nn.Module, option: str) -> None:
    """Refuse ``option`` (asking for a re-estimation) up front on a model without BatchNorm."""
    if not batch_norms(model):
        raise ValueError(f"{option}: {NO_BATCH_NORM}; drop {option}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of ``loader``.

    Do this after quantization-aware training, before deploying: during training the running
    statistics average over weight states that flipped between levels (and, for the rounding
    baseline, over full-precision weights), not the final rounded network's (Nagel et al., ICML
    2022, re-estimate on 50 batches; so does ``benchmarks/compare.py``).

    The statistics are reset and then accumulated as a plain average over the batches
    (``momentum=None``), from train-mode forwards without gradients; nothing else changes. The
    model's training mode and each BatchNorm's momentum are restored afterwards; if the loader
    fails or runs short, so are the statistics. ``loader`` yields ``(inputs, targets)`` or bare
    inputs. A model without BatchNorm (a transformer) has nothing to re-estimate: it is returned
    as it is, with a warning, so that one loop serves every model.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    norms = batch_norms(model)
    if not norms:
        warnings.warn(f"recalibrate_bn: {NO_BATCH_NORM}; the model is unchanged",
                      stacklevel=3)   # past torch.no_grad's wrapper: the caller
        return model
    saved = [(m.momentum, copy.deepcopy(m.state_dict())) for m in norms]
    was_training = model.training
    device = next(model.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for batch in loader:
            if seen == batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            seen += 1
        if seen < batches:
            raise ValueError(f"the loader gave {seen} batches, fewer than the {batches} asked for")
    except BaseException:
        for m, (_, state) in zip(norms, saved):
            m.load_state_dict(state)
        raise
    finally:
        for m, (momentum, _) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    return model


def post_training_rounding(model: nn.Module, config: CBPConfig, loader: Iterable | None = None,
                           batches: int = 50) -> nn.Module:
    """Prepare ``model`` (forward = nearest level, ``a = mean|W|``) with no training, in place.

    With a ``loader`` and ``batches >= 1`` the BatchNorm statistics are then re-estimated for the
    rounded weights (:func:`recalibrate_bn`). ``cbp.convert`` of the result gives the plain
    rounded network. All or nothing: the work is done on a copy first, so an error (a selection
    that matches nothing, a loader that fails) leaves ``model`` as it was.
    """
    if loader is None:
        return prepare(model, config)   # checks every layer before it changes one
    rounded = recalibrate_bn(prepare(model, config, inplace=False), loader, batches)
    prepare(model, config)   # the same layers and scales: both are taken from the same weights
    model.load_state_dict(rounded.state_dict())
    return model
