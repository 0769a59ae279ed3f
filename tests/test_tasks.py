"""cbp.zoo.tasks: which task a run is, what its loss and example input are, what it evaluates."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_gpt
from torch.utils.data import TensorDataset

import cbp
from cbp.core.distributed import Context
from cbp.zoo.tasks import Classification, LanguageModel, _shard_batches, task_of
from cbp.zoo.text import CharVocab, CharWindows

CPU = torch.device("cpu")


def test_language_model_evaluation_is_the_mean_token_loss_and_bits_per_char():
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (16 * 5 + 1,))
    data = CharWindows(tokens, 16, CharVocab("abcdefghijk"))
    result = LanguageModel.evaluate(model, data, cbp.core.distributed.setup("cpu"), batch_size=2)
    with torch.no_grad():
        x, y = tokens[:-1].view(5, 16), tokens[1:].view(5, 16)
        expected = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)


def _scores(logits, y):
    """Top-1, top-5 (%) and mean cross-entropy, one sample at a time."""
    top1 = top5 = loss = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        rank = sorted(row, reverse=True).index(row[label])
        top1, top5 = top1 + (rank == 0), top5 + (rank < 5)
        loss -= row[label] - math.log(sum(math.exp(v) for v in row))
    return 100 * top1 / len(y), 100 * top5 / len(y), loss / len(y)


def test_classification_evaluation_takes_every_world_size_th_sample():
    """Each process scores its share (samples rank, rank + world, ...); all_reduce_sum is the
    identity in one process, so a rank's figures here are those of its share alone."""
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 7), torch.randn(11, 4), torch.randint(0, 7, (11,))
    with torch.no_grad():
        logits = model(x)
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        got = Classification.evaluate(model, TensorDataset(x, y), Context(rank, world, CPU),
                                      batch_size=3)
        top1, top5, loss = _scores(logits[rank::world], y[rank::world])
        assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
        assert got["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_shard_batches_size_device_and_memory_format():
    model = nn.Linear(1, 1).train()
    images = TensorDataset(torch.randn(5, 3, 2, 2), torch.arange(5))
    batches = list(_shard_batches(model, images, Context(1, 2, CPU), 1, channels_last=True))
    assert not model.training and [y.tolist() for _, y in batches] == [[1], [3]]
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
               for x, _ in batches)
    batches = list(_shard_batches(model, images, Context(0, 1, CPU), 2, channels_last=False))
    assert [y.tolist() for _, y in batches] == [[0, 1], [2, 3], [4]]
    assert all(x.is_contiguous() for x, _ in batches)
    vectors = TensorDataset(torch.randn(2, 3), torch.arange(2))   # not an image: left as it is
    [(x, y)] = _shard_batches(model, vectors, Context(0, 1, torch.device("meta")), 4, True)
    assert x.device.type == y.device.type == "meta" and x.shape == (2, 3)


def test_losses_are_the_mean_cross_entropy_per_sample_or_token():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5), torch.tensor([4, 0, 2])
    assert Classification.loss(logits, labels).item() == pytest.approx(_scores(logits, labels)[2])
    tokens, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    expected = _scores(tokens.reshape(6, 5), targets.reshape(6))[2]
    assert LanguageModel.loss(tokens, targets).item() == pytest.approx(expected, rel=1e-6)


def test_example_inputs_have_the_recorded_shape():
    image = Classification.example_input({"input_size": [1, 28, 28], "num_classes": 10})
    assert image.shape == (2, 1, 28, 28) and image.dtype == torch.float32
    torch.manual_seed(0)
    text = LanguageModel.example_input({"input_size": [64], "num_classes": 2})
    assert text.shape == (2, 64) and text.dtype == torch.long
    assert set(text.flatten().tolist()) == {0, 1}   # every token of the vocabulary can occur
    assert Classification.vocab(None) is None
    assert LanguageModel.vocab(CharWindows(torch.zeros(3), 1, CharVocab("ab"))) == "ab"


@pytest.mark.parametrize(("meta", "task"), [
    ({"task": "language-model"}, LanguageModel),
    ({"task": "classification", "model": "gpt", "epoch": 1, "val_loss": 2.0}, Classification),
    ({"epoch": 3, "top1": 50.0, "val_loss": 1.5}, Classification),   # log rows
    ({"epoch": 3, "val_loss": 1.5, "bpc": 2.2}, LanguageModel),
    ({}, Classification),                                             # checkpoints before tasks
    ({"model": "resnet20"}, Classification),
    ({"model": "resnet20", "dataset": "fashion-mnist"}, Classification),
    ({"model": "gpt"}, LanguageModel),
    ({"dataset": "shakespeare"}, LanguageModel),
    ({"model": "gpt", "dataset": "shakespeare"}, LanguageModel),
])
def test_task_of(meta, task):
    assert task_of(meta) is task


@pytest.mark.parametrize(("model", "dataset"), [("gpt", "fashion-mnist"), ("resnet20", "shakespeare")])
def test_task_of_refuses_a_model_that_does_not_fit_the_data(model, dataset):
    with pytest.raises(ValueError) as info:
        task_of({"model": model, "dataset": dataset})
    assert str(info.value) == (f"model {model} does not fit dataset {dataset}: language models "
                               "(gpt) take text (shakespeare), the others images")
