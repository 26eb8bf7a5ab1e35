"""Figures from recorded numbers. Each function takes data and returns a matplotlib Figure;
nothing here trains, and nothing touches pyplot's global state, so a saved figure is never blank.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from .config import TARGET_ACCURACY
from .data import CIFAR10_MEAN, CIFAR10_STD

History = Sequence[dict[str, Any]]
FIGURE_NAMES = {"loss": "validation_loss.png", "accuracy": "validation_accuracy.png"}
# No timestamps or versions in the files: regenerating a figure gives the same bytes.
PNG_METADATA = {"Software": None}


def _epochs(history: History) -> list[int]:
    return [row["epoch"] for row in history]


def plot_loss(history: History, title: str = "Validation loss") -> Figure:
    """Test (validation) loss per epoch, with the training loss for comparison."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = _epochs(history)
    ax.plot(epochs, [r["test_loss"] for r in history], "o-", label="validation (test) loss")
    ax.plot(epochs, [r["train_loss"] for r in history], "--", color="grey", label="training loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss (mean per image)")
    ax.set_title(title, fontsize=10 if "\n" in title else None)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_accuracy(
    history: History, title: str = "Validation accuracy", target: float = TARGET_ACCURACY
) -> Figure:
    """Test (validation) accuracy per epoch in percent, the target line and the best epoch."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = _epochs(history)
    test_acc = [100 * r["test_acc"] for r in history]
    ax.plot(epochs, test_acc, "o-", label="validation (test) accuracy")
    ax.plot(epochs, [100 * r["train_acc"] for r in history], "--", color="grey",
            label="training accuracy")  # fmt: skip
    ax.axhline(100 * target, color="tab:red", linestyle=":", label=f"target {target:.0%}")
    best = max(range(len(history)), key=lambda i: test_acc[i])
    ax.annotate(
        f"best {test_acc[best]:.2f}% (epoch {epochs[best]})",
        (epochs[best], test_acc[best]), textcoords="offset points", xytext=(0, -18),
        ha="right" if best == len(history) - 1 else "center",
    )  # fmt: skip
    ax.set(xlabel="epoch", ylabel="accuracy (%)")
    ax.set_title(title, fontsize=10 if "\n" in title else None)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)
    return path


def save_history_figures(history: History, out_dir: str | Path, caption: str = "") -> list[Path]:
    """Write validation_loss.png and validation_accuracy.png into ``out_dir``."""
    suffix = "\n" + textwrap.fill(caption, 70) if caption else ""
    return [
        save_figure(
            plot_loss(history, "Validation loss" + suffix), Path(out_dir) / FIGURE_NAMES["loss"]
        ),
        save_figure(
            plot_accuracy(history, "Validation accuracy" + suffix),
            Path(out_dir) / FIGURE_NAMES["accuracy"],
        ),
    ]


def to_displayable(images: Tensor, normalized: bool = False) -> Tensor:
    """(N, 3, H, W) uint8, or normalised floats, -> (N, H, W, 3) floats in [0, 1]."""
    images = images.detach().float().cpu()
    if normalized:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        images = images * std + mean
    else:
        images = images / 255
    return images.clamp(0, 1).permute(0, 2, 3, 1)


def plot_image_grid(
    images: Tensor,
    titles: Sequence[str],
    *,
    normalized: bool = False,
    columns: int = 8,
    title: str = "",
    title_colors: Sequence[str] | None = None,
) -> Figure:
    """A grid of images, each with a small title (class name, or true/predicted labels)."""
    pictures = to_displayable(images, normalized)
    rows = max(1, -(-len(pictures) // columns))
    fig = Figure(figsize=(1.6 * columns, 1.8 * rows + 0.4), layout="constrained")
    for index in range(rows * columns):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.axis("off")
        if index < len(pictures):
            ax.imshow(pictures[index].numpy())
            color = title_colors[index] if title_colors else "black"
            ax.set_title(titles[index], fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    return fig


def plot_class_balance(counts: Sequence[int], classes: Sequence[str], title: str = "") -> Figure:
    """Images per class, as bars."""
    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(classes, counts, color="tab:blue")
    ax.set(title=title or "Images per class", ylabel="images")
    ax.tick_params(axis="x", rotation=45)
    for x, count in enumerate(counts):
        ax.annotate(str(count), (x, count), ha="center", va="bottom", fontsize=8)
    return fig
