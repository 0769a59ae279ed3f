"""cbp.zoo.tasks: what a task computes when it evaluates a model."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt

import cbp
from cbp.zoo.tasks import LanguageModel
from cbp.zoo.text import CharVocab, CharWindows


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
