"""PyTorch Lightning: ``Trainer(callbacks=[CBPCallback(config)])`` runs CBP on an unchanged module.

The hooks, in the order Lightning calls them:

- ``setup`` (stage ``"fit"``): ``cbp.prepare`` the LightningModule in place (names as in
  ``pl_module.named_modules()``), before ``configure_optimizers`` and before a checkpoint is
  loaded into it (a prepared model's state has the levels' buffers).
- ``on_fit_start``: wrap the one optimizer ``configure_optimizers`` returned in a
  :class:`cbp.CBPOptimizer` (kept as it is if it already is one). Its state dict carries CBP's
  state, so Lightning's checkpoint holds it and ``fit(ckpt_path=...)`` restores it; Lightning
  loads optimizer states after this hook.
- ``on_train_batch_end``: add the batch's training loss to the epoch's sum. Lightning hands the
  loss divided by ``accumulate_grad_batches``; it is multiplied back.
- ``on_train_epoch_end``: CBP's epoch end (g, lambda, the lr drop; L_sum averaged over processes),
  before ``ModelCheckpoint`` saves (Lightning runs checkpoint callbacks last). Training stops
  once g exceeds ``stop_once_g_exceeds``.
- ``on_fit_end``: ``cbp.export`` to ``export`` (rank 0) and/or ``cbp.convert`` the module in place
  (plain layers with weights on the levels) if asked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import lightning.pytorch as pl

from ..core.config import CBPConfig
from ..core.layers import convert, prepare, quantized_layers
from ..core.optim import CBPOptimizer
from ..files.export import export as export_model


class CBPCallback(pl.Callback):
    """CBP for a LightningModule: prepare, constrained steps, the epoch clock, export."""

    def __init__(self, config: CBPConfig, convert: bool = False,
                 export: str | os.PathLike | None = None) -> None:
        self.config, self.convert, self.export = config, convert, export
        self.optimizer: CBPOptimizer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not quantized_layers(pl_module):
            prepare(pl_module, self.config)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"CBPCallback needs configure_optimizers to return one optimizer, "
                             f"got {len(optimizers)}")
        if not isinstance(optimizers[0], CBPOptimizer):
            trainer.strategy.optimizers = [CBPOptimizer(pl_module, optimizers[0], self.config)]
        self.optimizer = trainer.strategy.optimizers[0]
        if math.isfinite(trainer.estimated_stepping_batches):
            self.optimizer.plan(int(trainer.estimated_stepping_batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:   # None: training_step skipped the batch
            self.optimizer.add_loss(loss * trainer.accumulate_grad_batches)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizer.end_epoch()
        if self.optimizer.finished:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export is not None and trainer.is_global_zero:
            export_model(pl_module, self.export)
        if self.convert:
            convert(pl_module, inplace=True)
