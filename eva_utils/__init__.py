"""eva_utils: ResNet18 with Ghost BatchNorm on CIFAR-10, for the EVA8 session 8 assignment.

Importing the package touches no disk, network or device, and imports nothing heavy: each name
below loads its module (and torch) when first used. That keeps ``python -m eva_utils`` able to
handle Ctrl-C and SIGTERM from its first moment, before torch has loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "PRESETS": "config", "TARGET_ACCURACY": "config", "Config": "config",
    "get_preset": "config", "hyperparameter_table": "config",
    "CIFAR10_CLASSES": "data", "CIFAR10_MEAN": "data", "CIFAR10_STD": "data",
    "ImageSet": "data", "load_cifar10": "data",
    "fit": "engine", "load_datasets": "engine", "predict": "engine", "select_device": "engine",
    "summarize_history": "engine", "test": "engine", "train": "engine",
    "EvaError": "errors", "GhostBatchNorm2d": "gbn",
    "count_parameters": "model", "resnet18": "model", "resnet34": "model",
    "compare": "results",
    "print_summary": "summary", "summary": "summary",
}  # fmt: skip
_SUBMODULES = (
    "analysis", "checkpoint", "cli", "config", "data", "engine", "errors", "gbn", "loaders",
    "model", "notebook", "plots", "pretrained", "progress", "receptive_field", "results",
    "summary",
)  # fmt: skip

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "Config", "EvaError", "GhostBatchNorm2d",
    "ImageSet", "PRESETS", "TARGET_ACCURACY", "compare", "count_parameters", "fit", "get_preset",
    "hyperparameter_table", "load_cifar10", "load_datasets", "predict", "print_summary",
    "receptive_field", "resnet18", "resnet34", "select_device", "summarize_history", "summary",
    "test", "train",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        # `eva_utils.receptive_field` is the module and, called, its receptive_field() function.
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what the names are, for readers, editors and type checkers
    from . import receptive_field
    from .config import PRESETS, TARGET_ACCURACY, Config, get_preset, hyperparameter_table
    from .data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ImageSet, load_cifar10
    from .engine import (
        fit,
        load_datasets,
        predict,
        select_device,
        summarize_history,
        test,
        train,
    )  # fmt: skip
    from .errors import EvaError
    from .gbn import GhostBatchNorm2d
    from .model import count_parameters, resnet18, resnet34
    from .results import compare
    from .summary import print_summary, summary
