"""What a trained model gets wrong: confusion matrix, per-class accuracy, misclassified images,
and its effective receptive field next to an untrained one's.

Functions named for a quantity return data; ``plot_*`` functions take that data and return a
matplotlib Figure. :func:`analyze` composes them for a run folder (the ``analyze`` command).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config
from .data import ImageSet
from .engine import build_model, load_datasets, predict
from .errors import CheckpointError
from .loaders import DeviceLoader
from .plots import plot_image_grid
from .receptive_field import (
    RFRow,
    effective_receptive_field,
    layer_field,
    plot_erf,
)

BATCH_SIZE = 500  # evaluation batch: no gradients, so larger than a training batch
ERF_IMAGES = 128  # images averaged for each effective receptive field
GALLERY_SIZE = 32
FIGURE_NAMES = {
    "misclassified": "misclassified.png",
    "confusion_matrix": "confusion_matrix.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "erf": "erf.png",
}


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistakes:
    """Misclassified images, most confident mistakes first.

    ``images`` (M, 3, H, W) are uint8, or normalised floats when ``normalized``; ``labels`` the
    true classes, ``predicted`` the model's, ``confidence`` its probability for its prediction
    (in [0, 1]); ``indices`` the images' positions in the data they came from.
    """

    images: Tensor
    labels: Tensor
    predicted: Tensor
    confidence: Tensor
    indices: Tensor
    normalized: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def find_mistakes(
    probabilities: Tensor, labels: Tensor, images: Tensor, *, normalized: bool = False
) -> Mistakes:
    """The wrong predictions among (N, classes) ``probabilities`` for (N,) ``labels``."""
    confidence, predicted = probabilities.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)]
    return Mistakes(
        images[wrong], labels[wrong], predicted[wrong], confidence[wrong], wrong, normalized
    )


def predictions(
    model: nn.Module,
    data: ImageSet | Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """(probabilities (N, classes), labels (N,)) on the CPU, for an ImageSet (normalised as in
    training, not augmented) or a loader of (images, labels) batches. Eval mode."""
    loader = DeviceLoader(data, batch_size, device=device) if isinstance(data, ImageSet) else data
    total = len(loader) if hasattr(loader, "__len__") else None
    batches = tqdm(loader, total=total, desc="predict", disable=not progress, leave=False)
    return predict(model, batches, device=device)


def misclassified(
    model: nn.Module,
    data: ImageSet | Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
) -> Mistakes:
    """The images ``model`` gets wrong. From an ImageSet the images come back as uint8; from a
    loader, as the normalised batches it yields (all of which are held in memory once)."""
    if isinstance(data, ImageSet):
        probs, labels = predictions(
            model, data, device=device, batch_size=batch_size, progress=progress
        )
        return find_mistakes(probs, labels, data.images)
    batches = [(images.cpu(), labels.cpu()) for images, labels in data]
    probs, labels = predictions(model, batches, device=device, progress=progress)
    images = torch.cat([images for images, _ in batches])
    return find_mistakes(probs, labels, images, normalized=True)


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    predicted, labels = predicted.flatten().long().cpu(), labels.flatten().long().cpu()
    counts = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    return counts.view(num_classes, num_classes)


def per_class_accuracy(matrix: Tensor) -> Tensor:
    """Fraction in [0, 1] of each true class predicted correctly (NaN for a class with no
    images), from a confusion matrix."""
    totals = matrix.sum(1)
    correct = matrix.diagonal().double()
    return torch.where(totals > 0, correct / totals.clamp(min=1), torch.nan)


# --- drawing -----------------------------------------------------------------------------------


def plot_misclassified(
    mistakes: Mistakes, classes: Sequence[str], *, count: int = GALLERY_SIZE, columns: int = 8
) -> Figure:
    """The ``count`` most confident mistakes, titled "true → predicted (confidence)"."""
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


# --- a trained run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedRun:
    """The best epoch of a run folder, rebuilt: its config, classes and model (eval mode)."""

    folder: Path
    config: Config
    classes: tuple[str, ...]
    model: nn.Module
    epoch: int
    test_acc: float


def load_run(folder: str | Path) -> TrainedRun:
    """Rebuild ``folder/best.pt``'s model on the CPU. Raises CheckpointError with the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"run folder {folder} does not exist: train one with "
            f"python -m eva_utils train --out {folder}"
        )
    path = folder / checkpoint.BEST
    state = checkpoint.load_checkpoint(path)
    config = Config.from_dict(state["config"])
    model = build_model(config, len(state["classes"]))
    checkpoint.load_weights(model, state, path)
    return TrainedRun(
        folder, config, tuple(state["classes"]), model.eval(), state["epoch"], state["test_acc"]
    )


def load_test_set(run: TrainedRun, data: str | None = None) -> ImageSet:
    """The run's test set: same data source and test subset as its config, unless ``data``
    names another source (the subset size and seed stay the run's)."""
    config = run.config if data is None else run.config.replace(data=str(data))
    return load_datasets(config)[1]


@dataclass(frozen=True)
class Report:
    """Everything :func:`analyze` measured; :meth:`figures` draws it."""

    classes: tuple[str, ...]
    matrix: Tensor
    accuracy: Tensor
    mistakes: Mistakes
    erf_layer: str
    erf_field: RFRow
    erf_untrained: Tensor
    erf_trained: Tensor

    @property
    def overall_accuracy(self) -> float:
        return float(self.matrix.diagonal().sum() / self.matrix.sum().clamp(min=1))

    def figures(self, caption: str = "") -> dict[str, Figure]:
        """The four figures, keyed like :data:`FIGURE_NAMES`."""
        suffix = f"\n{caption}" if caption else ""
        return {
            "misclassified": plot_misclassified(self.mistakes, self.classes),
            "confusion_matrix": plot_confusion_matrix(
                self.matrix,
                self.classes,
                f"Confusion matrix (accuracy {self.overall_accuracy:.2%}){suffix}",
            ),
            "per_class_accuracy": plot_per_class_accuracy(
                self.accuracy, self.classes, self.overall_accuracy, f"Accuracy per class{suffix}"
            ),
            "erf": plot_erf(
                self.erf_untrained,
                self.erf_trained,
                self.erf_field,
                title=f"Effective receptive field of the centre unit of {self.erf_layer}{suffix}",
            ),
        }


def untrained_like(run: TrainedRun) -> nn.Module:
    """The run's architecture with fresh weights drawn from the run's seed (the global random
    state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.config.seed)
        return build_model(run.config, len(run.classes)).eval()


def analyze(
    run: TrainedRun,
    test_set: ImageSet,
    *,
    device: torch.device | str = "cpu",
    erf_images: int = ERF_IMAGES,
    erf_layer: str | None = None,
    progress: bool = False,
) -> Report:
    """Evaluate ``run`` on ``test_set`` and measure its effective receptive field, and an
    untrained twin's, on the first ``erf_images`` test images."""
    model = run.model.to(device)
    probs, labels = predictions(model, test_set, device=device, progress=progress)
    matrix = confusion_matrix(probs.argmax(1), labels, len(run.classes))
    field = layer_field(model, erf_layer, tuple(test_set.images.shape[1:]))
    layer = field.name
    erf_inputs = test_set.subset(torch.arange(min(erf_images, len(test_set))))
    loader = DeviceLoader(erf_inputs, 64, device=device)
    erf = {
        name: effective_receptive_field(net, loader, layer, device=device, progress=progress)
        for name, net in (("untrained", untrained_like(run)), ("trained", model))
    }
    return Report(
        classes=run.classes,
        matrix=matrix,
        accuracy=per_class_accuracy(matrix),
        mistakes=find_mistakes(probs, labels, test_set.images),
        erf_layer=layer,
        erf_field=field,
        erf_untrained=erf["untrained"],
        erf_trained=erf["trained"],
    )
