"""The recipe in code: a Config's network, optimizer and learning-rate schedule.

The notebook's section 5 shows this file. :func:`build_model` turns the config's ``arch``,
``norm``, ``num_splits`` and ``dropout`` into a network of :mod:`eva_utils.model` with the norm
layer of :mod:`eva_utils.gbn`; :func:`build_optimizer` and :func:`build_scheduler` give the
session8 recipe's SGD (lr 0.016, momentum 0.9, weight decay 5e-4) and StepLR (x0.92 every 2
epochs), or whatever the config says.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .config import ARCHITECTURES, NORMS, Config, choice_problem, get_preset, refuse
from .gbn import GhostBatchNorm2d
from .model import NormLayer, ResNet, resnet18, resnet34, resnet_tiny

NETWORKS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18, "resnet34": resnet34, "tiny": resnet_tiny,
}  # fmt: skip


def norm_layer(norm: str = "bn", num_splits: int = 2) -> NormLayer:
    """The constructor for a norm slot: ``"bn"`` (BatchNorm2d) or ``"gbn"`` (GhostBatchNorm2d
    with ``num_splits`` ghost batches)."""
    refuse(choice_problem("norm", norm, NORMS))
    return nn.BatchNorm2d if norm == "bn" else partial(GhostBatchNorm2d, num_splits=num_splits)


def build_model(config: Config, num_classes: int = 10) -> ResNet:
    """The config's network (GBN and dropout included when the config says so)."""
    refuse(choice_problem("arch", config.arch, ARCHITECTURES))
    build = NETWORKS[config.arch]
    return build(num_classes, norm_layer(config.norm, config.num_splits), config.dropout)


def preset_model(preset: str | None = None) -> ResNet:
    """The named preset's network; ``None``: plain ``resnet18()``, the assignment's table."""
    return resnet18() if preset is None else build_model(get_preset(preset))


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD; with ``decay_norm_bias=False`` norm weights and biases (1-d tensors) get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_bias:
        groups = [{"params": params, "weight_decay": config.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR (stepped once per epoch) or OneCycleLR over the whole run (stepped per batch)."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=config.warmup,
        anneal_strategy="linear",
        div_factor=10.0,
        final_div_factor=100.0,
        cycle_momentum=False,
    )
