"""Small helpers that keep the notebooks thin: Colab detection, parameters, example batches.

The notebooks' parameter cells hold the values a student edits. Two environment variables
override them without editing the notebook: ``EVA_SMOKE=1`` (a tiny synthetic run for CI) and
``EVA_<NAME>`` for any Config field (``EVA_EPOCHS=10``), used to record the stored outputs;
every override is printed, so the outputs say what produced them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import typing
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import LAST, environment
from .config import Config, get_preset, parse_field
from .data import ImageSet
from .engine import select_device
from .loaders import DeviceLoader

SMOKE_ENV = "EVA_SMOKE"
# A run that exercises every cell in seconds on a CPU, with no data set and no network.
SMOKE = {"epochs": 1, "data": "synthetic", "train_size": 256, "test_size": 128, "device": "cpu"}
COLAB_GPU_ADVICE = (
    "WARNING: this Colab runtime has no GPU, training will be very slow. Choose "
    "Runtime > Change runtime type > T4 GPU (or better), then Runtime > Run all."
)


def in_colab() -> bool:
    return "google.colab" in sys.modules


def smoke_mode() -> bool:
    return os.environ.get(SMOKE_ENV) == "1"


def device_report(name: str = "auto") -> str:
    """'Device: ...' with the GPU or CPU name, and advice when Colab runs without a GPU."""
    device = select_device(name)
    report = f"Device: {device.type.upper()} ({environment(device)['device_name']})"
    if in_colab() and device.type != "cuda":
        report += "\n" + COLAB_GPU_ADVICE
    return report


def notebook_config(preset: str = "session8", **values: typing.Any) -> Config:
    """The preset with the parameter cell's ``values``, then any environment overrides."""
    config = get_preset(preset).replace(**values)
    overrides = {}
    for field in dataclasses.fields(Config):
        text = os.environ.get(f"EVA_{field.name.upper()}")
        if text is not None:
            overrides[field.name] = parse_field(field.name, text)
    if smoke_mode():
        overrides.update(SMOKE)
        print(f"{SMOKE_ENV}=1: a smoke run on synthetic data, not a real result")
    for name, value in overrides.items():
        print(f"override: {name} = {value!r} (the cell says {getattr(config, name)!r})")
    return config.replace(**overrides)


def run_folder(default: str) -> Path:
    """``EVA_RUN_DIR`` if set, a fresh temporary folder in smoke mode, else ``default``."""
    if smoke_mode():
        return Path(tempfile.mkdtemp(prefix="eva8-smoke-"))
    folder = Path(os.environ.get("EVA_RUN_DIR", default))
    if "EVA_RUN_DIR" in os.environ:
        print(f"override: run folder = {str(folder)!r} (the cell says {default!r})")
    return folder


def can_resume(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint to continue (after a disconnect, say)."""
    found = (Path(folder) / LAST).exists()
    if found:
        print(f"{folder} holds a checkpoint: continuing that run (delete the folder to restart)")
    return found


def augmented_examples(dataset: ImageSet, config: Config, count: int = 32) -> tuple[Tensor, Tensor]:
    """The first ``count`` training images after the config's augmentation (normalised)."""
    examples = dataset.subset(torch.arange(min(count, len(dataset))))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DeviceLoader(examples, count, augment=config.augment,
                          rotate_degrees=config.rotate_degrees, generator=generator)  # fmt: skip
    return next(iter(loader))


def history_table(history: list[dict]) -> str:
    """The history as an aligned text table, accuracies in percent."""
    lines = [" epoch  train loss  train acc  test loss  test acc        lr  seconds"]
    for row in history:
        lines.append(
            f"{row['epoch']:>6}  {row['train_loss']:>10.4f}  {row['train_acc']:>9.2%}  "
            f"{row['test_loss']:>9.4f}  {row['test_acc']:>8.2%}  {row['lr']:>8.5f}  "
            f"{row['seconds']:>7.1f}"
        )
    return "\n".join(lines)
