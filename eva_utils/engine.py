"""Training and evaluation epochs: ``train`` and ``test`` run one epoch and return plain numbers.

How each batch is computed (device, memory format, mixed precision, test-time flipping,
compilation) is the :class:`~eva_utils.step.Step`'s business; the loops here are the algorithm.
Loss and accuracy are summed on the device and read back once per epoch (and at each progress
refresh), so the loop never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TrainingDiverged
from .progress import batch_bar
from .step import Step

REFRESH_EVERY = 20  # steps between progress-bar updates (each one reads the loss from the device)
Batches = Iterable[tuple[Tensor, Tensor]]


class EpochMeter:
    """Loss and accuracy of an epoch, summed on the device: updating it never waits for the
    GPU; :meth:`check_finite` and :meth:`result` read it back (once per epoch, or per progress
    refresh)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.images = 0
        self.steps = 0

    def update(self, loss_sum: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``loss_sum`` is its loss summed over its images."""
        loss_sum = loss_sum.detach().float()
        self.loss_sum += loss_sum
        self.correct += (logits.argmax(1) == labels).sum()
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~loss_sum.isfinite(), self.steps, self.first_bad
        )
        self.images += len(labels)
        self.steps += 1

    def check_finite(self, desc: str) -> None:
        """Raise :class:`TrainingDiverged` naming the first batch whose loss was not finite."""
        step = int(self.first_bad)
        if step >= 0:
            raise TrainingDiverged(f"the loss became NaN or infinite in {desc}, step {step + 1}")

    @property
    def loss(self) -> float:
        return self.loss_sum.item() / max(self.images, 1)

    def result(self) -> dict[str, float]:
        """``{"loss": mean loss per image, "acc": fraction in [0, 1], "images": count}``."""
        return {
            "loss": self.loss,
            "acc": self.correct.item() / max(self.images, 1),
            "images": self.images,
        }


def train(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    step: Step | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """One training epoch of ``model`` over ``loader``'s batches, each computed by ``step``
    (default: a plain fp32 step where the model is).

    Returns ``{"loss": mean loss per image, "acc": fraction in [0, 1], "images": count}``.
    Raises :class:`TrainingDiverged` naming the first step whose loss was not finite.
    """
    step = step or Step(model)
    model.train()
    meter = EpochMeter(step.device)
    batches = batch_bar(loader, desc=desc, progress=progress)
    for number, batch in enumerate(batches):
        images, labels = step.to_device(batch)
        loss, logits = step.train(images, labels, optimizer)
        meter.update(loss * len(labels), logits, labels)
        if progress and number % REFRESH_EVERY == REFRESH_EVERY - 1:
            meter.check_finite(desc)
            batches.set_postfix(loss=f"{meter.loss:.3f}", refresh=False)
    meter.check_finite(desc)
    return meter.result()


@torch.no_grad()
def test(
    model: nn.Module,
    loader: Batches,
    step: Step | None = None,
    progress: bool = True,
    desc: str = "test",
) -> dict[str, float]:
    """Evaluate ``model`` in eval mode. The loss (cross-entropy) is averaged over images, not
    batches.

    Returns ``{"loss", "acc" (fraction in [0, 1]), "images"}``; the loss may be NaN (a diverged
    model): the caller decides what that means.
    """
    step = step or Step(model)
    model.eval()
    meter = EpochMeter(step.device)
    for batch in batch_bar(loader, desc=desc, progress=progress):
        images, labels = step.to_device(batch)
        logits = step.evaluate(images)
        meter.update(F.cross_entropy(logits, labels, reduction="sum"), logits, labels)
    return meter.result()
