"""What a run learns: the loss of a batch and the validation metrics, per kind of model.

The training loop is the same for an image classifier and a language model; only these differ,
and :func:`task_of` is the one place that tells which a run is.
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

from ..core.distributed import Context, all_reduce_sum
from .data import TEXT_DATASETS
from .models import LANGUAGE_MODELS


def _shard_batches(model: nn.Module, data: Dataset, ctx: Context, batch_size: int,
                   channels_last: bool):
    """The batches of this process's share of ``data``, on its device, the model in eval mode.

    Each process takes every ``world_size``-th sample, so the sums of all processes cover each
    exactly once; an image batch goes channels-last if the run trains so.
    """
    model.eval()
    shard = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    for x, y in DataLoader(shard, batch_size=batch_size):
        x, y = x.to(ctx.device), y.to(ctx.device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


class Classification:
    name = "classification"
    headline = "top1"   # the figure progress bars and plots show
    can_generate = False

    @staticmethod
    def vocab(data: Dataset) -> str | None:
        """The characters of a text data set (what a checkpoint records); a classifier has none."""
        return None

    @staticmethod
    def example_input(meta: dict) -> torch.Tensor:
        """Two inputs of the shape a run's ``meta`` records (what ONNX export traces with)."""
        return torch.randn(2, *meta["input_size"])

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, data: Dataset, ctx: Context, channels_last: bool = False,
                 batch_size: int = 500) -> dict:
        """Top-1, top-5 (top-k for fewer classes) and loss over the whole of ``data``."""
        totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # top1, top5, loss, n
        for x, y in _shard_batches(model, data, ctx, batch_size, channels_last):
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
    can_generate = True

    @staticmethod
    def vocab(data: Dataset) -> str | None:
        return data.vocab.chars

    @staticmethod
    def example_input(meta: dict) -> torch.Tensor:
        return torch.randint(0, meta["num_classes"], (2, *meta["input_size"]))

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, data: Dataset, ctx: Context, channels_last: bool = False,
                 batch_size: int = 64) -> dict:
        """Mean cross-entropy per token over all of ``data`` and bits per character."""
        totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, tokens
        for x, y in _shard_batches(model, data, ctx, batch_size, channels_last):
            loss = F.cross_entropy(model(x).flatten(0, -2).float(), y.flatten(), reduction="sum")
            totals += torch.stack([loss.double(), torch.tensor(y.numel(), device=ctx.device)])
        loss, n = all_reduce_sum(totals).tolist()
        return {"val_loss": loss / n, "bpc": loss / n / math.log(2)}


TASKS = {task.name: task for task in (Classification, LanguageModel)}


def task_of(meta: dict):
    """The task of a run: the one place that tells a language model from a classifier.

    ``meta`` is a checkpoint's metadata (its ``task``; runs from before tasks existed are
    classifiers), a row of ``log.jsonl`` (a classifier's has ``top1``), or, for a run being set up,
    its ``model`` and/or ``dataset`` names: a language model needs text, the others images.
    """
    if "task" in meta:
        return TASKS[meta["task"]]
    if "epoch" in meta:   # the first task whose headline figure the row has
        return next(task for task in TASKS.values() if task.headline in meta)
    model, dataset = meta.get("model"), meta.get("dataset")
    is_lm, is_text = model in LANGUAGE_MODELS, dataset in TEXT_DATASETS
    if model is not None and dataset is not None and is_lm != is_text:
        raise ValueError(f"model {model} does not fit dataset {dataset}: language models "
                         f"({', '.join(LANGUAGE_MODELS)}) take text ({', '.join(TEXT_DATASETS)}), "
                         "the others images")
    return LanguageModel if is_lm or is_text else Classification
