"""cbp.integrations.transformers end to end with the real transformers package: a 2-layer Llama
built from a config (no download) on Shakespeare's characters, ternary decoder Linears."""

import dataclasses
import glob
import os
import types

import pytest
import torch
import torch.nn as nn
from conftest import _assert_same

import cbp
from cbp.zoo.text import load_text, shakespeare_dir

transformers = pytest.importorskip("transformers")
from cbp.integrations.transformers import CBPCallback  # noqa: E402

CONFIG = cbp.CBPConfig(levels="ternary", skip_first_last=False, include=[r"\.layers\.\d+\."],
                       p_max=1, multiplier_lr=0.5, lr_drop_at_g=None)
PLAY = "hamlet_gut.txt"   # one play: the windows are read in a fraction of a second


@pytest.fixture(scope="module")
def windows():
    if not glob.glob(os.path.join(shakespeare_dir(), PLAY)):
        pytest.skip("Shakespeare's texts are not there: run scripts/setup.sh")
    data = load_text(shakespeare_dir(), train=True, context=32, limit=64, pattern=PLAY)
    return data.vocab, [{"input_ids": x, "labels": x} for x, _ in data]


def llama(vocab, config=CONFIG):
    """A prepared 2-layer Llama and its CBPOptimizer (AdamW)."""
    torch.manual_seed(0)
    llama_config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = cbp.prepare(transformers.LlamaForCausalLM(llama_config), config)
    adamw = torch.optim.AdamW(cbp.param_groups(model, weight_decay=0.0), lr=3e-3)
    return model, cbp.CBPOptimizer(model, adamw, config)


def trainer(model, optimizer, data, out, **settings):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, lr_scheduler_type="constant",
        report_to="none", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        **{"save_strategy": "no", **settings})
    return transformers.Trainer(model=model, args=args, train_dataset=data,
                                optimizers=(optimizer, None), callbacks=[CBPCallback(optimizer)])


def test_trainer_quantizes_the_decoder_and_keeps_head_and_embeddings_float(windows, tmp_path):
    vocab, data = windows
    model, optimizer = llama(vocab)
    assert len(cbp.quantized_layers(model)) == 2 * 7        # q k v o gate up down, per layer
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    batch = torch.stack([w["input_ids"] for w in data[:16]])
    with torch.no_grad():
        before = float(model(input_ids=batch, labels=batch).loss)
    cfs_before = cbp.cfs(model)
    trainer(model, optimizer, data, tmp_path, num_train_epochs=6).train()
    model.eval()
    with torch.no_grad():
        after = float(model(input_ids=batch, labels=batch).loss)
    assert after < before - 0.5, (before, after)             # uniform over Hamlet's 65: 4.17
    assert optimizer.lagrangian.g == 7                      # 6 epochs of 8 steps, p_max = 1
    assert cbp.cfs(model) < cfs_before / 10, (cfs_before, cbp.cfs(model))
    plain = cbp.convert(model)
    scale = float(model.model.layers[0].mlp.down_proj.cbp_scale)
    levels = (plain.model.layers[0].mlp.down_proj.weight / scale).unique()
    assert torch.allclose(levels, torch.tensor([-1.0, 0.0, 1.0]))


def test_resume_from_checkpoint_is_exact(windows, tmp_path):
    """24 steps straight (a checkpoint at step 12, mid-epoch) vs a fresh model, optimizer and
    Trainer resuming from that checkpoint: the same weights, lambda, g, AdamW moments."""
    vocab, data = windows
    model, optimizer = llama(vocab)
    trainer(model, optimizer, data, tmp_path / "a", max_steps=24, save_strategy="steps",
            save_steps=12).train()
    assert optimizer.lagrangian.g == 4                      # epoch ends at steps 8, 16, 24
    # planned for 24 steps: the penalty pass is chosen at step 6, with 19 to go
    assert "estimated over 19 steps" in optimizer.lagrangian.penalty_pass

    resumed, resumed_opt = llama(vocab)
    forwards = []
    resumed.register_forward_hook(lambda *_: forwards.append(1))
    trainer(resumed, resumed_opt, data, tmp_path / "b", max_steps=24).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-12"))
    assert len(forwards) == 12                              # it did start at step 12
    assert "estimated over 7 steps" in resumed_opt.lagrangian.penalty_pass   # 12 planned
    _assert_same(resumed.state_dict(), model.state_dict(), "weights")
    _assert_same(resumed_opt.state_dict(), optimizer.state_dict(), "optimizer")


def test_callback_refuses_an_optimizer_the_trainer_does_not_step(windows, tmp_path):
    vocab, data = windows
    model, optimizer = llama(vocab)
    other = cbp.CBPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), CONFIG)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                          use_cpu=True, max_steps=1)
    run = transformers.Trainer(model=model, args=args, train_dataset=data,
                               optimizers=(optimizer, None), callbacks=[CBPCallback(other)])
    with pytest.raises(ValueError, match="not the one the Trainer steps"):
        run.train()


def test_data_without_a_length_needs_epoch_steps(windows, tmp_path):
    vocab, data = windows

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    model, optimizer = llama(vocab)
    with pytest.raises(ValueError, match="epoch_steps=N"):
        trainer(model, optimizer, Stream(), tmp_path, max_steps=2).train()
    model, optimizer = llama(vocab)
    run = trainer(model, optimizer, Stream(), tmp_path, max_steps=6)
    run.callback_handler.remove_callback(CBPCallback)
    run.add_callback(CBPCallback(optimizer, epoch_steps=3))
    run.train()
    assert optimizer.lagrangian.g == 3                      # CBP epochs end at steps 3 and 6


def test_accumulated_epochs_the_stop_and_the_hook_removed(windows, tmp_path, monkeypatch):
    """8 batches of 8 forwards each accumulated: one optimizer step per epoch, so CBP's epoch
    ends at every step; g = 2, 3 exceeds stop_once_g_exceeds = 2 at step 2: training stops.
    Each of the 16 training forwards added its loss; after training the model's forwards add
    none, and ending training again removes nothing more."""
    vocab, data = windows
    model, optimizer = llama(vocab, dataclasses.replace(CONFIG, stop_once_g_exceeds=2))
    added = []
    add_loss = optimizer.add_loss
    monkeypatch.setattr(optimizer, "add_loss",
                        lambda loss: added.append(float(loss.detach())) or add_loss(loss))
    run = trainer(model, optimizer, data, tmp_path, num_train_epochs=5,
                  gradient_accumulation_steps=8)
    run.train()
    assert run.state.global_step == 2 and optimizer.lagrangian.g == 3
    assert len(added) == 2 * 8 and min(added) > 0
    next(c for c in run.callback_handler.callbacks if isinstance(c, CBPCallback)).on_train_end(
        run.args, run.state, run.control)
    model.train()
    batch = torch.stack([w["input_ids"] for w in data[:2]])
    model(input_ids=batch, labels=batch)
    assert len(added) == 2 * 8 and float(optimizer.state_dict()["cbp"]["loss_sum"]) == 0.0


def test_only_training_forwards_add_their_loss(windows):
    vocab, _ = windows
    model, optimizer = llama(vocab)
    callback = CBPCallback(optimizer)

    def added(module, output):
        before = float(optimizer.state_dict()["cbp"]["loss_sum"])
        callback._add_loss(module, (), output)
        return float(optimizer.state_dict()["cbp"]["loss_sum"]) - before

    loss = torch.tensor(1.5)
    training, evaluating = types.SimpleNamespace(training=True), types.SimpleNamespace(training=False)
    assert added(training, {"loss": loss}) == 1.5
    assert added(training, types.SimpleNamespace(loss=loss)) == 1.5   # a plain object's .loss
    assert added(evaluating, {"loss": loss}) == 0.0                    # model.eval()
    with torch.no_grad():
        assert added(training, {"loss": loss}) == 0.0                  # no gradient: not training
    with pytest.raises(ValueError, match="give the batches labels"):
        added(training, types.SimpleNamespace(logits=loss))


def test_callback_arguments_are_checked(windows):
    vocab, _ = windows
    _, optimizer = llama(vocab)
    with pytest.raises(TypeError, match="got AdamW"):
        CBPCallback(optimizer.base_optimizer)
    for bad in (0, -1, 2.0, "3"):
        with pytest.raises(ValueError, match="epoch_steps must be a positive integer"):
            CBPCallback(optimizer, epoch_steps=bad)
    assert CBPCallback(optimizer, epoch_steps=1).epoch_steps == 1
    CBPCallback(optimizer).on_train_end(None, None, None)   # no training began: nothing to remove
