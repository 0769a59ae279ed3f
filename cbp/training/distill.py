"""Distillation from the full-precision model: the quantized student also matches its teacher.

The loss of a batch becomes ``(1 - alpha) * task + alpha * T**2 * KL(teacher || student)``, the
KL divergence between the teacher's and the student's output distributions at temperature ``T``
(Hinton et al., 2015), averaged over the positions that make a prediction: each sample of a
classifier, each next character of a language model. ``T**2`` keeps the gradient of the soft
term at the scale of the task loss's whatever the temperature (its gradient in the logits is
``T * (softmax(s / T) - softmax(t / T))``).

Why: quantizing starts from a float network that is already good, and its output distribution
carries more per example than a label (which wrong classes are close, how sure the next character
is). Defaults ``alpha = 0.5, T = 1``: equal weights and no softening, the usual T for a language
model's next-token distributions. The labels keep half the weight because the teacher is not
always right; no softening because the teacher is the same network at full precision, whose
distribution is the very one the student should reproduce. Whether other values do better on
a model is for measuring (``benchmarks/RESULTS.md``). It serves every method (CBP, STE-only,
the peers): it changes only the loss.

In your own loop::

    teacher = copy.deepcopy(model)                    # before cbp.prepare(model, config)
    distill = cbp.Distillation(teacher, alpha=0.5, temperature=1.0)
    ...
    output = model(x)
    loss, terms = distill(x, output, F.cross_entropy(output, y))   # terms: (task, distill)
    loss.backward()

``cbp.training.train.fit`` does this when its ``Run`` has ``distillation=``, and logs the two terms'
epoch means (``task_loss``, ``distill_loss``) beside ``loss``.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import check_number

DEFAULT_ALPHA, DEFAULT_TEMPERATURE = 0.5, 1.0


class Distillation:
    """A frozen teacher and the weights of the distillation loss.

    ``teacher`` is put in eval mode (BatchNorm uses its running statistics, dropout is off) and
    its parameters stop requiring gradients; it runs under ``no_grad``, on the same batch as
    the student and on every DDP process (each process distils its own share of the batch).
    """

    def __init__(self, teacher: nn.Module, alpha: float = DEFAULT_ALPHA,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        check_number("alpha", alpha, above=0, at_most=1)
        check_number("temperature", temperature, above=0, below=float("inf"))
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        for p in teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()   # in case someone switched it back to training mode
        return self.teacher(x)

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``T**2 * KL(softmax(t / T) || softmax(s / T))`` averaged over predictions.

        The last dimension holds the classes (or characters); every other one indexes
        predictions: ``(batch, classes)`` or ``(batch, time, vocab)``.
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"distillation: the teacher's output has shape "
                             f"{tuple(teacher_logits.shape)}, the student's "
                             f"{tuple(student_logits.shape)}")
        t = self.temperature
        dtype = torch.promote_types(student_logits.dtype, torch.float32)  # half/bf16: in float32
        student = F.log_softmax(student_logits.flatten(0, -2).to(dtype) / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.flatten(0, -2).to(dtype) / t, dim=-1)
        kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        return t * t * kl

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             task_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * task_loss + alpha * divergence``."""
        return self._mix(task_loss, self.divergence(student_logits, teacher_logits))

    def _mix(self, task_loss: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * task_loss + self.alpha * divergence

    def __call__(self, x: torch.Tensor, student_logits: torch.Tensor,
                 task_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimise for the batch ``x``, and its two terms ``(task, divergence)``
        detached (what a log shows; unweighted)."""
        divergence = self.divergence(student_logits, self.teacher_logits(x))
        terms = torch.stack([task_loss.detach().double(), divergence.detach().double()])
        return self._mix(task_loss, divergence), terms


def file_sha256(path: str) -> str:
    """The SHA-256 of a file: how a resumed run checks that its teacher is the one it started
    with (the teacher is reloaded from its path, which might now hold another file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
