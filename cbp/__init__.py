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

from .cli.options import Recipe, load_config
from .core.baselines import post_training_rounding, recalibrate_bn
from .core.config import CBPConfig
from .core.constraint import constrained_mask, constraint, quantize, sawtooth
from .core.lagrangian import EpochEnd, Lagrangian
from .core.layers import QuantizedLayer, convert, param_groups, prepare, quantized_layers, select_layers
from .core.levels import LEVEL_SETS, resolve_factors
from .core.metrics import Agreement, agreement, cfs, fraction_on_levels, layer_stats
from .core.optim import CBPOptimizer
from .core.oscillation import OscillationTracker
from .files.export import ExportError, export
from .files.export_read import load_packed, read_packed
from .files.onnx_export import check_onnx, export_onnx
from .files.packing import bits_per_weight
from .files.summary import Summary, summary
from .training.distill import Distillation
from .training.peers import IterativeFreezing, OscillationDampening, OscillationGatedCBP

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
