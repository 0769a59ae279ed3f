"""Preparing a model: quantized Conv/Linear layers with a straight-through forward.

``prepare`` swaps the selected ``nn.Conv*d`` / ``nn.Linear`` modules for subclasses that keep the
same ``weight`` and ``bias`` Parameters (optimizers built before still work, ``state_dict`` keys
stay) and add two buffers: ``cbp_factors`` and the fixed scale ``cbp_scale = mean|W|`` taken from the
pretrained weights (0-d; or, with ``CBPConfig.scale = "per-channel"``, ``mean|W_c|`` per output
channel, shaped ``(out, 1, ...)`` to broadcast against the weight). Their forward uses the
nearest level; the backward passes the gradient to the real-valued weight unchanged
(straight-through estimator). ``convert`` turns them back into plain layers whose weights sit
exactly on the levels.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CBPConfig
from .constraint import quantize, scaled_levels
from .levels import check_distinct_in


class _StraightThrough(torch.autograd.Function):
    """Forward: nearest level. Backward: identity (dL/dw = dL/dw_q, unclipped)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return quantize(w, levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class QuantizedLayer:
    """Mixin for a layer whose forward weight is quantized to ``cbp_factors * cbp_scale``."""

    cbp_factors: torch.Tensor
    cbp_scale: torch.Tensor
    weight: nn.Parameter

    @property
    def levels(self) -> torch.Tensor:
        return scaled_levels(self.cbp_factors, self.cbp_scale).to(self.weight.dtype)

    def quantized_weight(self) -> torch.Tensor:
        return _StraightThrough.apply(self.weight, self.levels)


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv3d(QuantizedLayer, nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(QuantizedLayer, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


_QUANT_OF = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
             nn.Linear: QuantLinear}
_FLOAT_OF = {q: f for f, q in _QUANT_OF.items()}


def select_layers(model: nn.Module, config: CBPConfig) -> list[str]:
    """Names of the layers ``prepare`` quantizes, in module order."""
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in _QUANT_OF]
    if config.skip_first_last:
        candidates = candidates[1:-1]
    chosen = []
    for name, module in candidates:
        if config.filter_fn is not None and not config.filter_fn(module, name):
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            continue
        if any(re.search(p, name) for p in config.exclude):
            continue
        chosen.append(name)
    return chosen


def _selection_said(model: nn.Module, config: CBPConfig) -> str:
    """Why :func:`select_layers` chose nothing, naming only the rules that are on."""
    count = sum(type(m) in _QUANT_OF for m in model.modules())
    if not count:
        return "the model has no Conv1d/2d/3d or Linear layer"
    rules = [text for on, text in (
        (config.skip_first_last, "skip_first_last (the first and last are kept float; "
                                 "--quantize-first-last turns it off)"),
        (config.filter_fn is not None, "filter_fn"),
        (bool(config.include), f"include {list(config.include)}"),
        (bool(config.exclude), f"exclude {list(config.exclude)}")) if on]
    return (f"none of the model's {count} Conv/Linear layers passes the selection: "
            f"{', '.join(rules)}")


def _swap_class(module: nn.Module, cls: type) -> nn.Module:
    """A new module of type ``cls`` sharing ``module``'s parameters, buffers and settings."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()  # shares the Parameter objects: optimizers still work
    new._buffers = dict(module._buffers)
    return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``model``; returns the model.

    The root itself (``name == ""``, a bare layer given to ``prepare``) changes its class in
    place instead: assigning it as its own child would make a module that contains itself.
    """
    if not name:
        model.__class__ = type(module)
        model.__dict__.update(module.__dict__)
        return model
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return model


def _check_quantizable(name: str, weight: torch.Tensor, factors: torch.Tensor,
                       per_channel: bool = False) -> torch.Tensor:
    """The layer's scale ``a = mean|W|`` (per output channel: ``mean|W_c|``, shaped
    ``(out, 1, ...)``), or ``ValueError`` naming a layer that cannot be quantized.

    An all-zero (pruned) layer - or channel - has ``a = 0``: every level would be 0 and every
    metric divide by 0. It is refused before any training, with the way to leave it out; so are
    levels that the weights' dtype cannot tell apart at this scale.
    """
    label = repr(name) if name else "the model itself"
    if per_channel:
        scale = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True).float()
    else:
        scale = weight.abs().mean().float().reshape(())
    bad = ~((scale > 0) & scale.isfinite())
    if bool(bad.any()):
        where = f"output channel {int(bad.flatten().nonzero()[0])} of " if per_channel else ""
        worst = float(scale.flatten()[bad.flatten()][0])
        hint = (f"; leave it out with --exclude '^{re.escape(name)}$' (CBPConfig.exclude)"
                if name else "")
        raise ValueError(f"{where}layer {label} has {'all-zero' if worst == 0 else 'non-finite'} "
                         f"weights (scale mean|W| = {worst:g}), so it cannot be "
                         f"quantized{hint}")
    factors = factors.to(scale.device)
    for extreme in {float(scale.min()), float(scale.max())}:   # the levels that could collapse
        check_distinct_in((factors * extreme).double(), weight.dtype, f"layer {label}'s levels "
                          f"(factors times its scale {extreme:g})")
    return scale


def prepare(model: nn.Module, config: CBPConfig | None = None, inplace: bool = True) -> nn.Module:
    """Quantize the selected layers of ``model`` and return it.

    In place by default: the returned model *is* ``model``, whose layers now quantize, and it
    keeps its Parameter objects, so an optimizer built on ``model`` before still works.
    ``inplace=False`` prepares a deep copy and leaves ``model`` as it was (to keep the float
    model for comparison, e.g. ``cbp.agreement(model, prepared, loader)``).

    Each quantized layer gets its scale ``a = mean|W|`` (``config.scale``: per layer, or per
    output channel) now, from the weights it has, and keeps it fixed: prepare a pretrained model,
    not a random one you are about to train.
    """
    config = config or CBPConfig()
    if quantized_layers(model):
        raise ValueError("this model is already prepared; prepare a fresh float model")
    names = select_layers(model, config)
    if not names:
        raise ValueError(f"no layer left to quantize: {_selection_said(model, config)}")
    if not inplace:
        model = copy.deepcopy(model)
    factors = torch.tensor(config.factors, dtype=torch.float32)
    per_channel = config.scale == "per-channel"
    scales = {name: _check_quantizable(name, model.get_submodule(name).weight.detach(), factors,
                                       per_channel)
              for name in names}   # every layer checked before any is changed
    for name in names:
        module = model.get_submodule(name)
        quant = _swap_class(module, _QUANT_OF[type(module)])
        # a copy per layer: safetensors (Hugging Face's save_pretrained) refuses shared tensors
        quant.register_buffer("cbp_factors", factors.to(module.weight.device, copy=True))
        quant.register_buffer("cbp_scale", scales[name])
        model = _set_submodule(model, name, quant)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The prepared layers of ``model`` by name (empty if it was never prepared)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def distinct_quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The prepared layers with one entry per weight Parameter: of layers sharing a weight (tied
    weights) only the first by name is kept, so that the weight gets one multiplier, its penalty
    gradient is added once, and the metrics count it once."""
    seen, layers = set(), {}
    for name, layer in quantized_layers(model).items():
        if id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            layers[name] = layer
    return layers


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain ``nn.Conv*d`` / ``nn.Linear`` layers with weights snapped to their levels.

    The result needs no ``cbp`` code to run and computes exactly what the prepared model computes.
    A weight the quantized layer shares with a float layer (a head tied to an embedding) stays
    float there; the quantized layer gets its own snapped copy (:mod:`cbp.files.ties`).
    """
    if not inplace:
        model = copy.deepcopy(model)
    float_owned = {id(p) for m in model.modules() if not isinstance(m, QuantizedLayer)
                   for p in m.parameters(recurse=False)}
    copies: dict[int, nn.Parameter] = {}  # layers tied to each other (and a float one) stay tied
    for name, layer in quantized_layers(model).items():
        weight = layer.weight
        if id(weight) in float_owned:
            if id(weight) not in copies:
                copies[id(weight)] = nn.Parameter(quantize(weight.detach(), layer.levels),
                                                  requires_grad=weight.requires_grad)
            layer.weight = copies[id(weight)]
        else:
            with torch.no_grad():
                weight.copy_(quantize(weight, layer.levels))
        plain = _swap_class(layer, _FLOAT_OF[type(layer)])
        del plain._buffers["cbp_factors"], plain._buffers["cbp_scale"]
        model = _set_submodule(model, name, plain)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups with weight decay on Conv/Linear weights only, not on BatchNorm or biases.

    Quantized layers are Conv/Linear subclasses, so they decay like the float ones. A weight
    shared by two modules (an embedding tied to an output head) appears once, in the group its
    first module in ``model.modules()`` order puts it.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # a tied weight: its first owner decides
                continue
            seen.add(id(p))
            is_weight = pname == "weight" and isinstance(module, tuple(_QUANT_OF))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
