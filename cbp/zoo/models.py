"""Models of the paper (AlexNet-BN, ResNet-18/50, GoogLeNet), a small ResNet-20, a small GPT,
built by name (:func:`build_model`), with their weights (torchvision's, or a file).

``cbp.prepare`` leaves the first and the last Conv/Linear in ``named_modules()`` order at full
precision, so every CNN here registers its stem first and its classifier last. A transformer
needs another rule (:data:`DEFAULT_SELECTION`): the Linear layers inside its blocks.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..files.checkpoint import refused_as_unsafe, unsafe_reason
from .convnets import alexnet_bn, mobilenetv2_tiny, resnet20
from .gpt import CBP_SELECTION as GPT_SELECTION
from .gpt import GPT, GPTConfig, generate, gpt


class ModelError(ValueError):
    """Unknown model or unusable weights; the message is one line meant for the user."""


# The models of cbp.zoo.convnets and cbp.zoo.gpt: name -> builder(num_classes, in_channels). For the
# GPT num_classes is the vocabulary size and in_channels is unused.
_BUILDERS = {"resnet20": resnet20, "alexnet_bn": alexnet_bn, "mobilenetv2_tiny": mobilenetv2_tiny,
             "gpt": lambda vocab_size, _in_channels: gpt(vocab_size)}
MODEL_NAMES = ("resnet20", "resnet18", "resnet50", "googlenet", "alexnet_bn", "gpt",
               "mobilenetv2_tiny")
LANGUAGE_MODELS = ("gpt",)  # take token windows (cbp.zoo.text), not images
# Layer selection a model gets when the user names none; the others use CBPConfig's defaults.
DEFAULT_SELECTION = {"gpt": GPT_SELECTION}
__all__ = ["GPT", "GPTConfig", "generate", "gpt", "build_model", "load_weights", "resnet20",
           "alexnet_bn", "mobilenetv2_tiny", "ModelError", "MODEL_NAMES", "LANGUAGE_MODELS",
           "DEFAULT_SELECTION"]
_TORCHVISION = ("resnet18", "resnet50", "googlenet")

# The torchvision weights the paper started from: the original ImageNet recipe, whose top-1
# (torchvision's figures: ResNet-18 69.76%, ResNet-50 76.13%, GoogLeNet 69.78%) is the paper's
# full-precision column (69.6, 76.0 and 71.0: the paper used a GoogLeNet other than this). For
# ResNet-50, torchvision's DEFAULT is IMAGENET1K_V2 (80.86%), a later training recipe that would
# make any comparison with the paper's Table 1 wrong; "torchvision:IMAGENET1K_V2" asks for it.
PAPER_WEIGHTS = {"resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V1",
                 "googlenet": "IMAGENET1K_V1"}
TORCHVISION = "torchvision"


def is_torchvision(weights: str | None) -> bool:
    """``weights`` names published weights ("torchvision" or "torchvision:MEMBER"), not a file."""
    return weights is not None and (weights == TORCHVISION or weights.startswith(TORCHVISION + ":"))


def torchvision_weights(name: str, weights: str = TORCHVISION):
    """The torchvision ``WeightsEnum`` member that ``weights`` names for model ``name``.

    "torchvision" is the paper's (:data:`PAPER_WEIGHTS`); "torchvision:MEMBER" is any member of
    the model's enum, e.g. "torchvision:IMAGENET1K_V2" or "torchvision:DEFAULT".
    """
    import torchvision.models as tvm

    if name not in _TORCHVISION:
        raise ModelError(f"torchvision publishes no weights for {name}; pass a weights file")
    member = PAPER_WEIGHTS[name] if weights == TORCHVISION else weights.split(":", 1)[1]
    enum = tvm.get_model_weights(name)
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(f"torchvision:{w.name}" for w in enum)
        raise ModelError(f"torchvision has no {name} weights {member!r}; choose one of "
                         f"{choices} (or torchvision:DEFAULT)") from None


# Auxiliary classifiers of torchvision's GoogLeNet: its published weights hold them, but they are
# not trained; torchvision drops them when it loads the weights, and so do we (a file's too).
_GOOGLENET_AUX = ("aux1.", "aux2.")


def _torchvision_model(name: str, num_classes: int, in_channels: int, weights: str | None,
                       options: dict) -> nn.Module:
    """A torchvision model; its stem conv is rebuilt when the input is not RGB."""
    import torchvision.models as tvm

    if name == "googlenet":
        # torchvision's published GoogLeNet expects its own input scaling (``transform_input``,
        # set by its builder only when it loads weights). RGB GoogLeNets here always have it, so
        # that every GoogLeNet state_dict - torchvision's file, our checkpoints and exports -
        # loads into the same network; it reads exactly three channels, so grey input has none.
        options = {"transform_input": in_channels == 3, **options}
        if options["transform_input"] and in_channels != 3:
            raise ModelError(f"GoogLeNet's transform_input needs RGB input, not {in_channels}-channel "
                             "input")
    if is_torchvision(weights):
        if num_classes != 1000 or in_channels != 3:
            raise ModelError(f"torchvision's {name} weights are for 1000 classes and RGB input, "
                             f"not {num_classes} classes and {in_channels} channels")
        published = torchvision_weights(name, weights)
        try:  # googlenet's builder drops its auxiliary heads itself
            return tvm.get_model(name, weights=published, **options)
        except Exception as e:  # network and cache errors come in many types
            raise ModelError(f"cannot get torchvision's {name} weights: {e}") from e
    if name == "googlenet":
        options = {"aux_logits": False, "init_weights": True, **options}
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **options)
    if in_channels != 3:
        owner, attr = (model.conv1, "conv") if name == "googlenet" else (model, "conv1")
        old = getattr(owner, attr)
        stem = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                         bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        setattr(owner, attr, stem)  # same name, so the same registration position
    return model


def model_options(model: nn.Module) -> dict:
    """Settings of ``model`` that its ``state_dict`` does not hold but its forward depends on.

    Checkpoints record them (``meta["model_options"]``) and :func:`rebuild_model` passes them back
    to :func:`build_model`: GoogLeNet's ``transform_input`` today.
    """
    if hasattr(model, "transform_input"):
        return {"transform_input": bool(model.transform_input)}
    return {}


def rebuild_model(meta: dict) -> nn.Module:
    """The float architecture a checkpoint's ``meta`` describes, as it was built (no weights).

    Every path that loads a checkpoint builds through here, so a network is never rebuilt
    computing something else than it did in training. Checkpoints written before
    ``model_options`` was recorded get :func:`build_model`'s defaults.
    """
    return build_model(meta["model"], meta["num_classes"], meta["in_channels"],
                       **meta.get("model_options", {}))


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A state_dict from a .safetensors file or a torch file (never executing pickled code).

    A torch file may hold the state_dict itself or one under "model" (a cbp checkpoint); the
    second item is the file's ``meta`` when it has one (a cbp checkpoint's), else empty.
    """
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling/safetensors raise many types; all mean "unusable"
        if refused_as_unsafe(e):
            raise ModelError(f"cannot read weights {path}: {unsafe_reason(e)}") from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read weights {path}: {reason}") from e
    meta = {}
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
        state = state["model"]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"{path} holds no state_dict (a dict of tensors, or one under 'model')")
    return state, meta


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> nn.Module:
    """``model.load_state_dict(state)`` where keys and shapes match exactly, else a ModelError."""
    if getattr(model, "aux_logits", None) is False:  # a GoogLeNet without its auxiliary heads
        state = {k: v for k, v in state.items() if not k.startswith(_GOOGLENET_AUX)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches", reshaped)) if keys]
        raise ModelError(f"weights {path} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a local weights file into ``model``; keys and shapes must match exactly."""
    return _load_state(model, _read_weights(path)[0], path)


_OPTIONS = {"googlenet": ("transform_input",)}  # what build_model's **options may set


def build_model(name: str, num_classes: int, in_channels: int = 3,
                weights: str | None = None, **options) -> nn.Module:
    """A model by name, with random, published or local weights.

    ``weights``: None (random init), "torchvision" (the paper's published weights, see
    :data:`PAPER_WEIGHTS`), "torchvision:MEMBER" (any member of torchvision's weights enum for
    the model) or a local file (safetensors, a state_dict, or a cbp checkpoint). ``options`` are
    settings a state_dict does not hold (see :func:`model_options`); a cbp checkpoint given as
    ``weights`` supplies the ones it recorded, and those given here win. For a language model
    ``num_classes`` is the vocabulary size and ``in_channels`` is unused.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    state = None
    if weights is not None and not is_torchvision(weights):
        state, meta = _read_weights(weights)
        if meta.get("model") == name:
            options = {**meta.get("model_options", {}), **options}
    unknown = sorted(set(options) - set(_OPTIONS.get(name, ())))
    if unknown:
        raise ModelError(f"{name} has no option {', '.join(unknown)}")
    if name in _TORCHVISION:
        model = _torchvision_model(name, num_classes, in_channels, weights, options)
    elif is_torchvision(weights):
        raise ModelError(f"torchvision publishes no weights for {name}; pass a weights file")
    else:
        model = _BUILDERS[name](num_classes, in_channels)
    return model if state is None else _load_state(model, state, weights)
