"""Distillation from the float teacher (issue 23): the loss by hand, its gradient, the teacher kept
frozen, and ``cbp quantize --distill`` end to end (log terms, resume, the teacher's identity)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import one_thread

import cbp
from cbp.cli import commands as cli
from cbp.core.lagrangian import Lagrangian
from cbp.files.checkpoint import load_checkpoint, save_checkpoint
from cbp.training.distill import file_sha256
from cbp.training.runs import CHECKPOINT_NAME, LOG_NAME, read_jsonl


def test_loss_on_a_hand_computed_example():
    # teacher softmax(ln 3, 0) = (3/4, 1/4), student softmax(0, 0) = (1/2, 1/2)
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]])
    kl_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # 0.130812
    d = cbp.Distillation(nn.Identity(), alpha=0.25, temperature=1.0)
    assert float(d.divergence(student, teacher)) == pytest.approx(kl_t1, rel=1e-6)
    assert float(d.loss(student, teacher, torch.tensor(2.0))) == pytest.approx(
        0.75 * 2.0 + 0.25 * kl_t1, rel=1e-6)
    # T = 2: the teacher is softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (1 + sqrt 3); times T^2 = 4
    p = math.sqrt(3) / (1 + math.sqrt(3))
    kl_t2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    d2 = cbp.Distillation(nn.Identity(), alpha=1.0, temperature=2.0)
    assert float(d2.divergence(student, teacher)) == pytest.approx(4 * kl_t2, rel=1e-6)
    assert float(d2.loss(student, teacher, torch.tensor(5.0))) == pytest.approx(4 * kl_t2, rel=1e-6)
    # a language model's (batch, time, vocab): the mean over the batch x time predictions
    lm_student = torch.zeros(1, 2, 2)
    lm_teacher = torch.stack([teacher[0], torch.zeros(2)])[None]   # second position: no gap
    assert float(d.divergence(lm_student, lm_teacher)) == pytest.approx(kl_t1 / 2, rel=1e-6)


def test_gradient_matches_finite_differences_and_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    d = cbp.Distillation(nn.Identity(), alpha=0.7, temperature=2.5)
    assert torch.autograd.gradcheck(lambda x: d.divergence(x, t), (s,))
    (grad,) = torch.autograd.grad(d.divergence(s, t), s)
    # d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / predictions
    closed = 2.5 * (torch.softmax(s / 2.5, -1) - torch.softmax(t / 2.5, -1)) / 12
    torch.testing.assert_close(grad, closed)


def test_teacher_runs_frozen_in_eval_mode_on_the_batch():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    student = nn.Linear(4, 3)
    d = cbp.Distillation(teacher, alpha=0.5)
    teacher.train()   # switched back by mistake: the teacher still runs in eval mode
    x = torch.randn(6, 4)
    out = student(x)
    loss, terms = d(x, out, nn.functional.cross_entropy(out, torch.zeros(6, dtype=torch.long)))
    loss.backward()
    assert not teacher.training and all(p.grad is None and not p.requires_grad
                                        for p in teacher.parameters())
    assert float(teacher[1].num_batches_tracked) == 0   # BatchNorm used its running statistics
    assert float(loss.detach()) == pytest.approx(0.5 * float(terms[0]) + 0.5 * float(terms[1]))
    with torch.no_grad():
        expected = d.divergence(out, teacher.eval()(x))
    assert float(terms[1]) == pytest.approx(float(expected))


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0}, "alpha must be a number > 0 and <= 1, got 0"),
    ({"alpha": 1.5}, "alpha must be a number > 0 and <= 1, got 1.5"),
    ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
    ({"temperature": math.inf}, "temperature must be a finite number > 0, got inf")])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError) as err:
        cbp.Distillation(nn.Identity(), **kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_compared_in_float32_without_a_warning(dtype):
    gen = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 3, 5, generator=gen).to(dtype) for _ in range(2))
    d = cbp.Distillation(nn.Identity(), temperature=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an implicit softmax dimension warns at every step
        got = d.divergence(s, t)
    p, q = torch.softmax(t.float() / 2, -1), torch.softmax(s.float() / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).sum(-1).mean()   # T^2 KL(p || q), 6 predictions
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_file_sha256_is_the_files_hash_over_several_blocks(tmp_path):
    data = bytes(range(256)) * (5 << 11)   # 2.5 MiB: read in blocks of 1 MiB, the last partial
    path = tmp_path / "teacher.pt"
    path.write_bytes(data)
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_quantize_with_distill_logs_both_terms_and_resumes_mid_epoch_with_the_same_teacher(
        quantize_argv, pretrained, assert_same_run, tmp_path, capsys, monkeypatch, signals_raise):
    teacher = str(tmp_path / "teacher.pt")
    shutil.copy(pretrained, teacher)

    def argv(out: str) -> list[str]:
        return quantize_argv(out, 2, "--distill", "--teacher", teacher, "--distill-alpha", "0.75")

    reference, out = str(tmp_path / "reference"), str(tmp_path / "stopped")
    with one_thread():
        assert cli.main(argv(reference)) == 0
        rows = read_jsonl(os.path.join(reference, LOG_NAME))
        meta = load_checkpoint(os.path.join(reference, CHECKPOINT_NAME))["meta"]
        assert meta["teacher_sha256"] == file_sha256(teacher)
        assert meta["settings"]["distill_alpha"] == 0.75
        for row in rows:
            assert row["task_loss"] > 0 and row["distill_loss"] > 0
            assert row["loss"] == pytest.approx(0.25 * row["task_loss"] + 0.75 * row["distill_loss"])

        # stopped after the first step of epoch 2 (3 steps an epoch)
        step, count = Lagrangian.step, [0]

        def counted(self):
            step(self)
            count[0] += 1
            if count[0] == 4:
                os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(Lagrangian, "step", counted)
        assert cli.main(argv(out)) == 130
        monkeypatch.undo()
        assert load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["loss_terms"].min() > 0

        # a resume reloads the teacher by its path: another file there is refused
        other = load_checkpoint(teacher)
        other["meta"]["note"] = "another file"   # a valid teacher, other bytes
        save_checkpoint(other, teacher)
        capsys.readouterr()
        assert cli.main(quantize_argv(out, 2, "--resume")) == 2
        assert "teacher_sha256" in capsys.readouterr().err
        shutil.copy(pretrained, teacher)   # the teacher it started with: resumes to the bit
        assert cli.main(quantize_argv(out, 2, "--resume")) == 0
    assert_same_run(out, reference)


def test_distill_flags_are_checked(quantize_argv, tmp_path, capsys):
    for extra, message in ((["--teacher", "x.pt"], "--teacher names the teacher of --distill"),
                           (["--distill", "--distill-alpha", "0"], "--distill-alpha must be"),
                           (["--distill", "--distill-temperature", "-1"],
                            "--distill-temperature must be")):
        with one_thread():
            assert cli.main(quantize_argv(str(tmp_path / "bad"), 1, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
