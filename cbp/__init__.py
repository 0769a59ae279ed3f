"""cbp: constrained backpropagation (Kim & Jeong, NeurIPS 2021) for any PyTorch model.

    model = cbp.prepare(model, cbp.CBPConfig(levels="binary"))   # in place; STE backward
    lagrangian = cbp.Lagrangian(model, config, optimizer)          # lambda, g, p, L_sum_pre
    ... loss.backward(); lagrangian.step() ... lagrangian.end_epoch(loss_sum)
    optimizer = cbp.CBPOptimizer(model, optimizer, config)         # the same, for frameworks
    cbp.cfs(model)                                                 # paper Eq. 19, latent weights
    cbp.agreement(float_model, model, loader)                      # same predictions?
    cbp.recalibrate_bn(model, train_loader, batches=50)            # BN statistics of the final weights
    distill = cbp.Distillation(float_model, alpha=0.5)             # loss, terms = distill(x, out, loss)
    recipe = cbp.load_config("demo")                               # a config's CBPConfig + training
    plain = cbp.convert(model)                                     # weights on the levels
    cbp.export(model, "model.safetensors"); print(cbp.summary(model))  # bit-packed, truly small
"""

from .baselines import post_training_rounding, recalibrate_bn
from .config import CBPConfig
from .constraint import constrained_mask, constraint, quantize, sawtooth
from .distill import Distillation
from .export import ExportError, export
from .export_read import load_packed, read_packed
from .lagrangian import EpochEnd, Lagrangian
from .layers import QuantizedLayer, convert, param_groups, prepare, quantized_layers, select_layers
from .levels import LEVEL_SETS, resolve_factors
from .metrics import Agreement, agreement, cfs, fraction_on_levels, layer_stats
from .onnx_export import check_onnx, export_onnx
from .optim import CBPOptimizer
from .options import Recipe, load_config
from .oscillation import OscillationTracker
from .packing import bits_per_weight
from .peers import IterativeFreezing, OscillationDampening, OscillationGatedCBP
from .summary import Summary, summary

__all__ = [
    "CBPConfig", "CBPOptimizer", "EpochEnd", "ExportError", "Summary", "check_onnx", "export", "export_onnx",
    "load_packed", "read_packed", "summary", "LEVEL_SETS", "Lagrangian", "QuantizedLayer", "bits_per_weight",
    "cfs", "constrained_mask", "constraint", "convert", "fraction_on_levels", "layer_stats",
    "Recipe", "load_config", "param_groups", "prepare", "quantize", "quantized_layers",
    "resolve_factors", "sawtooth", "select_layers", "Agreement", "agreement", "recalibrate_bn",
    "post_training_rounding", "OscillationTracker", "OscillationDampening", "IterativeFreezing",
    "OscillationGatedCBP", "Distillation",
]
__version__ = "0.1.0"
