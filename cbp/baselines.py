"""Post-training rounding: the no-training baseline every low-bit method has to beat.

Rounding each weight of a trained network to its nearest level with ``a = mean|W|`` (BWN/TWN
style) is exactly what a prepared model computes before any fine-tuning, so
``post_training_rounding`` is :func:`cbp.prepare` plus one repair: the BatchNorm running
statistics were measured on full-precision activations and are wrong for the rounded weights (a
ResNet-20 on Fashion-MNIST rounded to binary or ternary drops to chance without it). Re-estimating
them on a few training batches, with no gradient step, recovers most of the loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .config import CBPConfig
from .layers import prepare

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 50) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` batches of ``loader``.

    Do this after quantization-aware training, before deploying: during training the running
    statistics average over weight states that flipped between levels (and, for the rounding
    baseline, over full-precision weights), not the final rounded network's (Nagel et al., ICML
    2022, re-estimate on 50 batches; so does ``benchmarks/compare.py``).

    The statistics are reset and then accumulated as a plain average over the batches
    (``momentum=None``), from train-mode forwards without gradients; nothing else changes. The
    model's training mode and each BatchNorm's momentum are restored afterwards. ``loader`` yields
    ``(inputs, targets)`` or bare inputs.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    if not norms:
        raise ValueError("the model has no BatchNorm layer with running statistics to re-estimate")
    momenta = [m.momentum for m in norms]
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
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if seen < batches:
        raise ValueError(f"the loader gave {seen} batches, fewer than the {batches} asked for")
    return model


def post_training_rounding(model: nn.Module, config: CBPConfig, loader: Iterable | None = None,
                           batches: int = 50) -> nn.Module:
    """Prepare ``model`` (forward = nearest level, ``a = mean|W|``) with no training, in place.

    With a ``loader`` and ``batches >= 1`` the BatchNorm statistics are then re-estimated for the
    rounded weights (:func:`recalibrate_bn`). ``cbp.convert`` of the result gives the plain
    rounded network.
    """
    prepare(model, config)
    if loader is not None:
        recalibrate_bn(model, loader, batches)
    return model
