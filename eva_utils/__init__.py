"""eva_utils: ResNet18 with Ghost BatchNorm on CIFAR-10, for the EVA8 session 8 assignment.

Importing the package touches no disk, network or device.
"""

from .config import PRESETS, TARGET_ACCURACY, Config, get_preset, hyperparameter_table
from .data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ImageSet, load_cifar10
from .engine import fit, load_datasets, predict, select_device, summarize_history, test, train
from .errors import EvaError
from .gbn import GhostBatchNorm2d
from .model import count_parameters, resnet18, resnet34
from .summary import print_summary, summary

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "PRESETS", "TARGET_ACCURACY", "Config",
    "EvaError", "GhostBatchNorm2d", "ImageSet", "count_parameters", "fit", "get_preset",
    "hyperparameter_table", "load_cifar10", "load_datasets", "predict", "print_summary",
    "resnet18", "resnet34", "select_device", "summarize_history", "summary", "test", "train",
]  # fmt: skip
