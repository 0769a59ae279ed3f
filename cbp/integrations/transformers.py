"""Hugging Face Trainer: ``Trainer(optimizers=(optimizer, None), callbacks=[CBPCallback(optimizer)])``.

The Trainer steps the optimizer it is given, so the constrained step is ``optimizer``'s, a
:class:`cbp.CBPOptimizer` over the prepared model; it saves and loads that optimizer's state dict
in every checkpoint, CBP's state with it, so ``train(resume_from_checkpoint=...)`` resumes CBP
exactly. A callback does the rest; the hooks:

- ``on_train_begin``: checks that ``optimizer`` is the one the Trainer steps; hooks the model's
  forward to read the loss of every training forward (the Trainer hands callbacks no loss; every
  Hugging Face model returns ``.loss`` when the batch has ``labels``).
- ``on_step_end`` (after each optimizer step): CBP's epoch end every ``epoch_steps`` optimizer
  steps - by default the Trainer's steps per epoch - counted on ``state.global_step``, so a
  resumed run ends its CBP epochs on the same steps (a Trainer checkpoint is saved after this
  hook). L_sum is averaged over processes. Training stops once g exceeds
  ``stop_once_g_exceeds``.
- ``on_train_end``: removes the forward hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from ..core.optim import CBPOptimizer


class CBPCallback(TrainerCallback):
    """The epoch clock and the loss sum of a :class:`cbp.CBPOptimizer` stepped by a Trainer."""

    def __init__(self, optimizer: CBPOptimizer, epoch_steps: int | None = None) -> None:
        if not isinstance(optimizer, CBPOptimizer):
            raise TypeError("CBPCallback takes the cbp.CBPOptimizer given to "
                            f"Trainer(optimizers=(optimizer, None)), got {type(optimizer).__name__}")
        if epoch_steps is not None and (not isinstance(epoch_steps, int) or epoch_steps < 1):
            raise ValueError(f"epoch_steps must be a positive integer or None, got {epoch_steps!r}")
        self.optimizer, self.epoch_steps = optimizer, epoch_steps
        self._steps = epoch_steps
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        stepped = optimizer
        while stepped is not self.optimizer and hasattr(stepped, "optimizer"):
            stepped = stepped.optimizer    # accelerate's AcceleratedOptimizer wraps it
        if stepped is not self.optimizer:
            raise ValueError("CBPCallback's optimizer is not the one the Trainer steps: pass the "
                             "same cbp.CBPOptimizer as Trainer(optimizers=(optimizer, None))")
        if self.epoch_steps is None:       # the Trainer's optimizer steps per epoch
            try:
                batches = len(train_dataloader)
            except TypeError:              # an IterableDataset without __len__
                raise ValueError("the training data has no length, so no epoch: give "
                                 "CBPCallback(optimizer, epoch_steps=N)") from None
            self._steps = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        self.optimizer.plan(state.max_steps - state.global_step)
        self._hook = model.register_forward_hook(self._add_loss)

    def _add_loss(self, module, inputs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):   # evaluation forwards
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError("CBPCallback reads the loss the model returns, and this training "
                             "forward returned none: give the batches labels")
        self.optimizer.add_loss(loss)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self._steps == 0:
            self.optimizer.end_epoch()
            if self.optimizer.finished:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
