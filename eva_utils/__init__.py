"""eva_utils: ResNet18 with Ghost BatchNorm on CIFAR-10, for the EVA8 session 8 assignment.

Reading order. The lesson is in seven files, each a notebook section
(``notebooks/session8_resnet18_gbn.ipynb``) and each short:

1. ``model.py`` (section 4): ``BasicBlock``, ``ResNet``, ``resnet18()``; torch alone.
2. ``gbn.py`` (section 4): ``GhostBatchNorm2d``, a BatchNorm over ghost batches; torch alone.
3. ``recipe.py`` (section 5): the config's network, SGD and StepLR.
4. ``data.py`` (section 3): CIFAR-10 as tensors; ``loaders.py`` augments and batches it.
5. ``engine.py`` and ``step.py`` (section 7): one epoch of ``train`` and ``test``, and the step
   with its zero_grad, forward, loss, backward and optimizer step.
6. ``training.py`` (section 7): ``fit``, the epochs, a checkpoint after each.
7. ``plots.py``, ``analysis.py``, ``results.py`` (sections 6, 8-10): curves, mistakes, the
   reference run; ``labels.py`` says what a run computed (its ghost batches, on its ranks).

The rest is machinery a lesson need not read: the run folder and its files (``runfolder``,
``state``, ``files``, ``locks``, ``archives``, ``signals``), hardware and speed (``devices``,
``precision``, ``ranks`` and ``demo_ranks`` of section 11), the command line (``cli``,
``sweeps``, ``summary``, ``progress``, ``errors``), and the notebooks' helpers (``notebook``,
``lesson``, ``colab``, ``pretrained``; ``receptive_fields`` for ``receptive_fields.ipynb``).
Only ``config.py`` is imported by nearly everything: every hyperparameter is a field of its
``Config``.

Importing the package touches no disk, network or device, and imports nothing heavy: each name
below loads its module (and torch) when first used. That keeps ``python -m eva_utils`` able to
handle Ctrl-C and SIGTERM from its first moment, before torch has loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names, each with the module that defines it: the one export list.
_EXPORTS = {
    "PRESETS": "config", "TARGET_ACCURACY": "config", "Config": "config",
    "get_preset": "config", "hyperparameter_table": "config",
    "CIFAR10_CLASSES": "data", "CIFAR10_MEAN": "data", "CIFAR10_STD": "data",
    "ImageSet": "data", "load_cifar10": "data",
    "fit": "training", "load_datasets": "data", "predict": "analysis",
    "select_device": "devices", "Step": "step", "test": "engine", "train": "engine",
    "EvaError": "errors", "GhostBatchNorm2d": "gbn",
    "count_parameters": "model", "resnet18": "model", "resnet34": "model",
    "build_model": "recipe",
    "receptive_field": "receptive_fields",
    "compare": "results", "summarize_history": "results",
    "print_summary": "summary", "summary": "summary", "sweep": "sweeps",
}  # fmt: skip
_SUBMODULES = (
    "analysis", "archives", "cli", "colab", "config", "data", "devices", "engine", "errors",
    "files", "gbn", "labels", "lesson", "loaders", "locks", "model", "notebook", "plots",
    "pretrained", "progress", "ranks", "receptive_fields", "recipe", "results", "runfolder",
    "signals", "state", "step", "summary", "sweeps", "training",
)  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # what the names are, for readers, editors and type checkers
    from .analysis import predict
    from .config import PRESETS, TARGET_ACCURACY, Config, get_preset, hyperparameter_table
    from .data import (
        CIFAR10_CLASSES,
        CIFAR10_MEAN,
        CIFAR10_STD,
        ImageSet,
        load_cifar10,
        load_datasets,
    )
    from .devices import select_device
    from .engine import test, train
    from .errors import EvaError
    from .gbn import GhostBatchNorm2d
    from .model import count_parameters, resnet18, resnet34
    from .receptive_fields import receptive_field
    from .recipe import build_model
    from .results import compare, summarize_history
    from .step import Step
    from .summary import print_summary, summary
    from .sweeps import sweep
    from .training import fit
