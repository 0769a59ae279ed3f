"""Tied weights: one Parameter under several ``state_dict`` keys (a token embedding and its output
head, in most language models).

An export stores such a tensor once, and loading makes the model share its Parameters the way
the file does. The one tie that cannot survive conversion is a quantized layer tied to a layer
that is not quantized: training kept one latent weight, which the quantized layer used snapped to
its levels and the float layer used as it is. :func:`cbp.convert` therefore gives the quantized
layer its own snapped copy and leaves the float layer the latent weight, so the converted model
(and the export, and ONNX) computes what the trained one did; such a file stores both.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def tied_keys(model: nn.Module) -> dict[str, str]:
    """Each Parameter key whose Parameter an earlier key (in ``state_dict`` order) holds: that key."""
    first: dict[int, str] = {}
    ties = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), key)
        if owner != key:
            ties[key] = owner
    return ties


def share_as_stored(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make ``model``'s Parameters shared as ``state``'s tensors are, before it loads ``state``.

    Keys holding one tensor object (a tie the file stored once) get one Parameter; keys the model
    ties but that hold different values (a quantized head tied to a float embedding) get a
    Parameter each. Any other Parameter is left as it is.
    """
    given: dict[int, nn.Parameter] = {}   # id of a stored tensor -> the Parameter that loads it
    holder: dict[int, str] = {}           # id of a Parameter -> the first key that loads it
    for key, param in list(model.named_parameters(remove_duplicate=False)):
        stored = state[key]
        target = given.get(id(stored), param)
        first = holder.get(id(target))
        if first is not None and state[first] is not stored and not torch.equal(state[first], stored):
            target = nn.Parameter(torch.empty_like(param), requires_grad=param.requires_grad)
        given.setdefault(id(stored), target)
        holder.setdefault(id(target), key)
        if target is not param:
            module_name, _, name = key.rpartition(".")
            setattr(model.get_submodule(module_name), name, target)
