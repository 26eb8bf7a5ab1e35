"""Figures from recorded numbers. Each function takes data and returns a matplotlib Figure;
nothing here trains, and nothing touches pyplot's global state, so a saved figure is never blank.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from .config import TARGET_ACCURACY
from .data import CIFAR10_MEAN, CIFAR10_STD
from .files import atomic_write
from .receptive_fields import RFRow, field_box

History = Sequence[dict[str, Any]]
GALLERY_SIZE = 32  # mistakes shown by default
FIGURE_NAMES = {"loss": "validation_loss.png", "accuracy": "validation_accuracy.png"}
# No timestamps or versions in the files: regenerating a figure gives the same bytes.
PNG_METADATA = {"Software": None}


def _epochs(history: History) -> list[int]:
    return [row["epoch"] for row in history]


def plot_loss(history: History, title: str = "Validation loss") -> Figure:
    """Test (validation) loss per epoch, with the training loss for comparison."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    _draw_loss(fig.add_subplot(), history, title)
    return fig


def plot_accuracy(
    history: History, title: str = "Validation accuracy", target: float = TARGET_ACCURACY
) -> Figure:
    """Test (validation) accuracy per epoch in percent, the target line and the best epoch."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    _draw_accuracy(fig.add_subplot(), history, title, target)
    return fig


def plot_curves(history: History) -> Figure:
    """The loss and the accuracy side by side: the notebook's curves while a run trains."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    loss, accuracy = fig.subplots(1, 2)
    _draw_loss(loss, history, "Loss")
    _draw_accuracy(accuracy, history, "Accuracy", TARGET_ACCURACY)
    return fig


def _draw_loss(ax: Axes, history: History, title: str) -> None:
    epochs = _epochs(history)
    ax.plot(epochs, [r["test_loss"] for r in history], "o-", label="validation (test) loss")
    ax.plot(epochs, [r["train_loss"] for r in history], "--", color="grey", label="training loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss (mean per image)")
    ax.set_title(title, fontsize=10 if "\n" in title else None)
    ax.grid(alpha=0.3)
    ax.legend()


def _draw_accuracy(ax: Axes, history: History, title: str, target: float) -> None:
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


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its format from the suffix) atomically: a symbolic link at
    ``path`` is replaced by the figure, never written through."""
    path = Path(path)
    format = path.suffix[1:].lower() or "png"
    atomic_write(path, lambda file: fig.savefig(file, format=format, dpi=120,
                                                metadata=PNG_METADATA))  # fmt: skip
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


# Lines of compared runs: each colour of matplotlib's default cycle with one line style and
# marker, then again with the next, so that no two runs look alike.
COLOURS = tuple(f"C{index}" for index in range(10))
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
MAX_COMPARED = len(COLOURS) * len(LINE_STYLES)  # runs one comparison figure can tell apart
LEGEND_COLUMNS = 2


def comparison_style(index: int) -> dict[str, str]:
    """Colour, line style and marker of the ``index``-th compared run (distinct for the first
    :data:`MAX_COMPARED`)."""
    linestyle, marker = LINE_STYLES[index // len(COLOURS) % len(LINE_STYLES)]
    return {"color": COLOURS[index % len(COLOURS)], "linestyle": linestyle, "marker": marker}


def plot_comparison(
    histories: Sequence[History], labels: Sequence[str], title: str = "",
    target: float = TARGET_ACCURACY,
) -> Figure:  # fmt: skip
    """Validation accuracy (left) and loss (right) of several runs (at most
    :data:`MAX_COMPARED`), one line each, with one legend below both plots."""
    if len(histories) > MAX_COMPARED:
        raise ValueError(f"{len(histories)} runs: one figure tells at most {MAX_COMPARED} apart")
    rows = -(-(len(histories) + 1) // LEGEND_COLUMNS)  # the legend's, with the target line
    fig = Figure(figsize=(11, 4.2 + 0.2 * rows), layout="constrained")
    accuracy, loss = fig.subplots(1, 2)
    for index, (history, label) in enumerate(zip(histories, labels)):
        epochs, style = _epochs(history), comparison_style(index)
        accuracy.plot(epochs, [100 * row["test_acc"] for row in history], ms=3, label=label,
                      **style)  # fmt: skip
        loss.plot(epochs, [row["test_loss"] for row in history], ms=3, **style)
    accuracy.axhline(100 * target, color="tab:red", linestyle=":", label=f"target {target:.0%}")
    accuracy.set(xlabel="epoch", ylabel="validation (test) accuracy (%)")
    loss.set(xlabel="epoch", ylabel="validation (test) loss (mean per image)")
    for ax in (accuracy, loss):
        ax.grid(alpha=0.3)
    # One legend for both plots, outside them: over the axes, many runs would hide the lines.
    fig.legend(loc="outside lower center", ncols=LEGEND_COLUMNS, fontsize=8, frameon=False)
    fig.suptitle(title or "Validation accuracy and loss", fontsize=10 if "\n" in title else None)
    return fig


LEGEND_WIDTH = 48  # characters of a legend entry's line: the legend sits inside the plot


def plot_sweep(
    cells: Sequence[dict[str, Any]], title: str = "", target: float = TARGET_ACCURACY
) -> Figure:
    """One curve per cell of a sweep (its ``sweep.json`` cells): the mean test accuracy over the
    seeds per epoch, with a band of one sample standard deviation either side."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for cell in cells:
        curve = cell["curve"]
        mean = [100 * acc for acc in curve["test_acc_mean"]]
        seeds = len(cell["seeds"])
        label = f"{cell['label']} ({seeds} {'seed' if seeds == 1 else 'seeds'})"
        label = textwrap.fill(label, LEGEND_WIDTH)  # a foreign run's label names many fields
        (line,) = ax.plot(curve["epoch"], mean, "o-", ms=3, label=label)
        if None not in curve["test_acc_std"]:  # one seed: no spread to draw
            spread = [100 * std for std in curve["test_acc_std"]]
            ax.fill_between(curve["epoch"], [m - s for m, s in zip(mean, spread)],
                            [m + s for m, s in zip(mean, spread)], color=line.get_color(),
                            alpha=0.2, linewidth=0)  # fmt: skip
    ax.axhline(100 * target, color="tab:red", linestyle=":", label=f"target {target:.0%}")
    ax.set(xlabel="epoch", ylabel="validation (test) accuracy (%), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    heading = "Mean test accuracy per cell; band: ± one sample std over the seeds"
    ax.set_title(f"{heading}\n{textwrap.fill(title, 100)}" if title else heading, fontsize=9)
    return fig


# --- what a trained model gets wrong, and what it sees ----------------------------------------


def plot_misclassified(
    mistakes: Any, classes: Sequence[str], *, count: int = GALLERY_SIZE, columns: int = 8
) -> Figure:
    """The ``count`` most confident of ``mistakes`` (an :class:`~eva_utils.analysis.Mistakes`),
    titled "true → predicted (confidence)"."""
    if mistakes.images is None:
        raise ValueError("these mistakes have no images: look them up with with_images(data)")
    shown = min(count, len(mistakes))
    titles = [
        f"{classes[t]} →\n{classes[p]} ({c:.0%})"
        for t, p, c in zip(
            mistakes.labels[:shown].tolist(), mistakes.predicted[:shown].tolist(),
            mistakes.confidence[:shown].tolist(),
        )
    ]  # fmt: skip
    return plot_image_grid(
        mistakes.images[:shown], titles, normalized=mistakes.normalized,
        columns=min(columns, max(shown, 1)), title_colors=["tab:red"] * shown,
        title=f"Misclassified: {shown} most confident of {len(mistakes)} (true → predicted)",
    )  # fmt: skip


def plot_confusion_matrix(matrix: Tensor, classes: Sequence[str], title: str = "") -> Figure:
    """Counts in each cell; colour = fraction of the true class (the row), so that classes of
    different sizes compare."""
    counts = matrix.cpu()
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in zip(
        torch.cartesian_prod(torch.arange(len(classes)), torch.arange(len(classes))).tolist(),
        counts.flatten().tolist(),
    ):
        color = "white" if fractions[row, col] > 0.5 else "black"
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    accuracy = counts.diagonal().sum() / max(int(counts.sum()), 1)
    ax.set(
        xlabel="predicted class",
        ylabel="true class",
        title=title or f"Confusion matrix (accuracy {accuracy:.2%})",
    )
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the true class")
    return fig


def plot_per_class_accuracy(
    accuracy: Tensor, classes: Sequence[str], overall: float | None = None, title: str = ""
) -> Figure:
    """Accuracy of each class in percent, with the overall accuracy as a line."""
    percent = (100 * accuracy.double()).nan_to_num(0.0).tolist()
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(classes)), percent, color="tab:blue")
    for x, value in enumerate(percent):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    if overall is not None:
        ax.axhline(
            100 * overall, color="tab:red", linestyle=":", label=f"all classes: {overall:.2%}"
        )
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), fontsize=8, frameon=False)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set(title=title or "Accuracy per class", ylabel="accuracy (%)", ylim=(0, 108))
    return fig


def plot_erf(
    untrained_map: Tensor,
    trained_map: Tensor,
    theoretical_rf: RFRow,
    *,
    titles: tuple[str, str] = ("untrained", "trained"),
    title: str = "Effective receptive field (gradient of the centre unit)",
) -> Figure:
    """The two (H, W) maps side by side, each with the theoretical field outlined (clipped to
    the image)."""
    image = tuple(untrained_map.shape)
    top, left, bottom, right = field_box(theoretical_rf, image)
    rf = theoretical_rf.rf
    clipped = (bottom - top, right - left) != tuple(float(r) for r in rf)
    label = f"theoretical field, {'x'.join(map(str, rf))} pixels"
    label += " (clipped to the image)" if clipped else ""
    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, erf, name in zip(axes, (untrained_map, trained_map), titles):
        shown = ax.imshow(erf.detach().cpu().numpy(), cmap="magma", vmin=0, vmax=1)
        box = Rectangle(
            (left, top),
            right - left,
            bottom - top,
            fill=False,
            edgecolor="tab:cyan",
            linewidth=2,
            linestyle="--",
        )
        ax.add_patch(box)
        ax.set_title(name)
        ax.set(xlabel="input x (pixels)", ylabel="input y (pixels)")
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="|gradient| (max = 1)")
    fig.legend([box], [label], loc="outside lower center", fontsize=9, frameon=False)
    fig.suptitle(title)
    return fig
