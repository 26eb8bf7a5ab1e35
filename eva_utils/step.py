"""One training or evaluation step: the single place that knows how a batch is computed.

:class:`Step` owns every trick that changes how, but not what, the network computes: the device
and memory format (channels_last) of the model and its batches, mixed precision (autocast, and a
gradient scaler for fp16), test-time flipping and ``torch.compile``. :func:`~eva_utils.engine.train`
and :func:`~eva_utils.engine.test` call it once per batch, so their loops read like the plain
algorithm, and a faster step (a captured CUDA graph) has one place to go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import Precision
from .ranks import Ranks

LossFn = Callable[..., Tensor]  # (logits, labels, reduction="mean") -> loss
FP32 = Precision(dtype=None, scaler=False, channels_last=False)  # the plain step


class Step:
    """How ``model`` computes a batch on ``device`` in ``precision``.

    The model is moved to the device and memory format once, here; ``self.model`` is what the
    step calls (``model`` itself, or its compiled version: the same weights). ``scheduler``, if
    given, steps after every training batch (OneCycleLR). Nothing here reads a value back from
    the device: the loss and logits stay there for the epoch meter.

    Among several ``ranks`` each batch is the global one: the step computes this rank's slice
    of it (:meth:`Ranks.share`) through DistributedDataParallel, weighting its loss so that the
    averaged gradient is the whole batch's mean loss's, also when the slices differ in size.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        precision: Precision = FP32,
        loss_fn: LossFn = F.cross_entropy,
        tta_flip: bool = False,
        compile: bool = False,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        if device is None:  # where the model already is
            device = next(model.parameters(), torch.empty(0)).device
        self.device = torch.device(device)
        self.precision = precision
        self.memory_format = (
            torch.channels_last if precision.channels_last else torch.contiguous_format
        )
        model.to(self.device, memory_format=self.memory_format)
        self.ranks = ranks = ranks or Ranks()
        shared = ranks.wrap(model, self.device)
        self.model = torch.compile(shared) if compile else shared
        self.weight = 1.0  # this rank's slice's share of the batch, times the world size
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision.scaler)
        self.loss_fn = loss_fn
        self.tta_flip = tta_flip
        self.scheduler = scheduler

    def to_device(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """A (images, labels) batch on the step's device, the images in its memory format;
        among several ranks, this rank's slice of it."""
        images, labels = batch
        if self.ranks.distributed:
            images, labels, whole = self.ranks.share(images), self.ranks.share(labels), len(labels)
            self.weight = self.ranks.world_size * len(labels) / whole
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision where the step computes in bf16 or fp16; nothing for fp32."""
        if self.precision.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def train(
        self, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[Tensor, Tensor]:
        """One optimisation step on a batch; returns (mean loss, logits), on the device."""
        with self.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages the ranks' gradients: weighted, the average is the
        # gradient of the whole batch's mean loss
        weighted = loss * self.weight if self.ranks.distributed else loss
        if self.scaler.is_enabled():  # fp16: scale the loss so small gradients do not vanish
            self.scaler.scale(weighted).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            weighted.backward()
            optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss, logits

    @torch.no_grad()
    def evaluate(self, images: Tensor) -> Tensor:
        """The float32 logits of a batch; with ``tta_flip`` the mean of the image's and its
        mirror image's."""
        with self.autocast():
            logits = self.model(images).float()
            if self.tta_flip:
                logits = (logits + self.model(images.flip(3)).float()) / 2
        return logits


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy with ``label_smoothing``, taking ``reduction`` like F.cross_entropy."""

    def loss_fn(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)

    return loss_fn
