"""cbp.integrations.lightning end to end with the real lightning package, on CPU."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import _assert_same
from torch.utils.data import DataLoader, TensorDataset

import cbp

pl = pytest.importorskip("lightning.pytorch")
from cbp.integrations.lightning import CBPCallback  # noqa: E402

CONFIG = cbp.CBPConfig(levels="ternary", p_max=1, multiplier_lr=0.5, lr_drop_at_g=None)


class Classifier(pl.LightningModule):
    """A 4-Linear MLP (the middle two are quantized) that records its training losses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)   # a rule the MLP can learn
    return DataLoader(TensorDataset(x, y), batch_size=32)        # unshuffled: resumable as is


def trainer(epochs, **kwargs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_callback_trains_to_levels_and_converts(tmp_path):
    class Score(pl.Callback):     # CFS after prepare, and before CBPCallback's convert
        def on_train_start(self, trainer, module):
            self.start = cbp.cfs(module)

        def on_fit_end(self, trainer, module):
            self.end = cbp.cfs(module)

    module, score = Classifier(), Score()
    callback = CBPCallback(CONFIG, convert=True, export=tmp_path / "model.safetensors")
    trainer(12, callbacks=[score, callback], enable_checkpointing=False).fit(module, loader())
    losses = torch.tensor(module.losses).view(12, 8).mean(1)
    assert losses[-1] < 0.6 * losses[0], losses          # the loss falls
    lagrangian = callback.optimizer.lagrangian
    assert score.end < score.start / 10, (score.start, score.end)   # pulled onto the levels
    assert lagrangian.g == 40 and set(lagrangian.multipliers) == {"net.2", "net.4"}
    # planned for the fit's 12 * 8 steps: the penalty pass is chosen at step 6, 91 steps to go
    assert "estimated over 91 steps" in lagrangian.penalty_pass, lagrangian.penalty_pass
    assert all(float(lam.max()) > 0 for lam in lagrangian.multipliers.values())
    # converted in place: plain layers, weights on {-a, 0, a} of each layer's scale
    assert not cbp.quantized_layers(module) and type(module.net[2]) is nn.Linear
    for name in ("net.2", "net.4"):
        scale = float(lagrangian.layers[name].cbp_scale)
        weight = module.get_submodule(name).weight.detach()
        assert set((weight / scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.allclose(weight.abs(), (weight.abs() > 0) * scale)
    rebuilt = cbp.load_packed(tmp_path / "model.safetensors", Classifier())
    x, _ = next(iter(loader()))
    assert torch.equal(rebuilt.net(x), module.net(x))   # the export computes what was trained


def test_resume_from_lightnings_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """4 epochs straight vs 2 epochs, Lightning's own checkpoint, a fresh module and trainer,
    ``fit(ckpt_path=...)`` to 4: the same weights, lambda, g, Adam moments."""
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1,
                                               filename="{epoch}")
    straight, callback = Classifier(), CBPCallback(CONFIG)
    trainer(4, callbacks=[callback, checkpoints]).fit(straight, loader())
    assert callback.optimizer.lagrangian.g == 5
    assert set(cbp.quantized_layers(straight)) == {"net.2", "net.4"}   # convert is off by default

    resumed, callback2 = Classifier(), CBPCallback(CONFIG)
    trainer(4, callbacks=[callback2], enable_checkpointing=False).fit(
        resumed, loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert len(resumed.losses) == 2 * 8                   # only epochs 3 and 4 ran
    _assert_same(resumed.state_dict(), straight.state_dict(), "weights")
    _assert_same(callback2.optimizer.state_dict(), callback.optimizer.state_dict(), "optimizer")


def test_two_optimizers_are_refused():
    class Two(Classifier):   # Lightning allows several optimizers with manual optimization
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                    torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    with pytest.raises(ValueError, match="one optimizer, got 2"):
        trainer(1, callbacks=[CBPCallback(CONFIG)], enable_checkpointing=False).fit(Two(), loader())


def test_setup_prepares_for_fit_only_and_only_a_float_module():
    TrainerFn = pl.trainer.states.TrainerFn   # what Lightning passes as stage
    module, callback = Classifier(), CBPCallback(CONFIG)
    assert callback.optimizer is None                         # until fit starts
    callback.setup(None, module, TrainerFn.VALIDATING)
    assert not cbp.quantized_layers(module)                   # validate/test/predict: as it is
    callback.setup(None, module, TrainerFn.FITTING)
    prepared = cbp.quantized_layers(module)
    assert set(prepared) == {"net.2", "net.4"}
    for layer in prepared.values():                           # with the callback's config
        assert layer.cbp_factors.tolist() == [-1.0, 0.0, 1.0]
    callback.setup(None, module, TrainerFn.FITTING)           # a second fit: not prepared again
    assert cbp.quantized_layers(module) == prepared


def test_batch_losses_skipped_batches_and_the_stop(monkeypatch):
    """Each batch's loss reaches the epoch's sum as training_step computed it (Lightning hands
    it divided by accumulate_grad_batches); a batch training_step skips (None) and a None batch
    from the loader (the hook gets no outputs) add nothing; the fit stops at the first epoch end
    where g exceeds stop_once_g_exceeds."""
    class Skipping(Classifier):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    added = []
    add_loss = cbp.CBPOptimizer.add_loss
    monkeypatch.setattr(cbp.CBPOptimizer, "add_loss",
                        lambda self, loss: added.append(float(loss)) or add_loss(self, loss))
    batches = list(loader())
    batches[6] = None                                   # Lightning warns and runs no step
    module = Skipping()
    config = dataclasses.replace(CONFIG, stop_once_g_exceeds=2)   # g = 1, 2, 3: stop after two
    trainer(5, callbacks=[CBPCallback(config)], enable_checkpointing=False,
            accumulate_grad_batches=2).fit(module, DataLoader(batches, batch_size=None))
    assert len(module.losses) == 2 * 6                  # batches 0, 2, 3, 4, 5, 7 of two epochs
    assert added == pytest.approx(module.losses, rel=1e-6)
