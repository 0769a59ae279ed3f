"""What a run learns: the loss of a batch and the validation metrics, per kind of model.

The training loop is the same for an image classifier and a language model; only these differ.
A classifier's output is ``(batch, classes)`` against ``(batch,)`` labels, scored by top-1/top-5;
a language model's is ``(batch, time, vocab)`` against ``(batch, time)`` next tokens, scored by
the mean cross-entropy per token (nats) and bits per character (the same in base 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import Context, all_reduce_sum


class Classification:
    name = "classification"
    headline = "top1"   # the figure progress bars and plots show

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, data: Dataset, ctx: Context, channels_last: bool = False,
                 batch_size: int = 500) -> dict:
        """Top-1, top-5 (top-k for fewer classes) and loss over the whole of ``data``.

        Each process takes every ``world_size``-th sample, so the sums cover each exactly once.
        """
        model.eval()
        shard = Subset(data, range(ctx.rank, len(data), ctx.world_size))
        totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top1, top5, loss, n
        for x, y in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(ctx.device), y.to(ctx.device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y[:, None]
            totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                                   F.cross_entropy(logits, y, reduction="sum"),
                                   torch.tensor(len(y), device=ctx.device)]).double()
        top1, top5, loss, n = all_reduce_sum(totals).tolist()
        return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "val_loss": loss / n}


class LanguageModel:
    name = "language-model"
    headline = "val_loss"

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, data: Dataset, ctx: Context, channels_last: bool = False,
                 batch_size: int = 64) -> dict:
        """Mean cross-entropy per token over all of ``data`` and bits per character.

        Each process takes every ``world_size``-th window, so the sums cover each exactly once.
        """
        model.eval()
        shard = Subset(data, range(ctx.rank, len(data), ctx.world_size))
        totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, tokens
        for x, y in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(ctx.device), y.to(ctx.device)
            loss = F.cross_entropy(model(x).flatten(0, -2).float(), y.flatten(), reduction="sum")
            totals += torch.stack([loss.double(), torch.tensor(y.numel(), device=ctx.device)])
        loss, n = all_reduce_sum(totals).tolist()
        return {"val_loss": loss / n, "bpc": loss / n / math.log(2)}


TASKS = {task.name: task for task in (Classification, LanguageModel)}


def task_of(meta: dict):
    """The task a run's metadata names (runs from before tasks existed are classifiers)."""
    return TASKS[meta.get("task", Classification.name)]
