"""What a trained model gets wrong: confusion matrix, per-class accuracy, misclassified images,
and its effective receptive field next to an untrained one's.

Functions named for a quantity return data; ``plot_*`` functions take that data and return a
matplotlib Figure. :func:`analyze` composes them for a run folder (the ``analyze`` command).
:func:`save_report` keeps the numbers behind the figures as a small JSON file, without pixels
(mistakes are test-set indices), from which the ``figures`` command redraws them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .config import Config
from .data import ImageSet, load_datasets
from .errors import CheckpointError, DataError, RunFileError, data_hint, option, train_command
from .files import atomic_write_text, read_json
from .loaders import DeviceLoader
from .plots import plot_confusion_matrix, plot_erf, plot_misclassified, plot_per_class_accuracy
from .progress import batch_bar
from .receptive_fields import RFRow, effective_receptive_field, layer_field
from .recipe import build_model
from .runfolder import (
    BEST,
    BEST_KEYS,
    check_classes,
    check_weights,
    load_checkpoint,
    load_weights,
)

BATCH_SIZE = 500  # evaluation batch: no gradients, so larger than a training batch
ERF_IMAGES = 128  # images averaged for each effective receptive field
FIGURE_NAMES = {
    "misclassified": "misclassified.png",
    "confusion_matrix": "confusion_matrix.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "erf": "erf.png",
}
REPORT_NAME = "analysis.json"  # the numbers behind the figures, written beside them
REPORT_FORMAT = 1
# Decimals kept in analysis.json: more than a figure shows (whole percents in titles, 256
# colours in a colour map), few enough to keep the file small.
REPORT_DECIMALS = {"accuracy": 6, "confidence": 4, "erf": 4}


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistakes:
    """Misclassified images, most confident mistakes first.

    ``images`` (M, 3, H, W) are uint8, or normalised floats when ``normalized``; ``labels`` the
    true classes, ``predicted`` the model's, ``confidence`` its probability for its prediction
    (in [0, 1]); ``indices`` the images' positions in the data they came from. ``images`` is
    None for mistakes read back from a report file, which holds no pixels: :meth:`with_images`
    looks them up again.
    """

    images: Tensor | None
    labels: Tensor
    predicted: Tensor
    confidence: Tensor
    indices: Tensor
    normalized: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def with_images(self, data: ImageSet) -> Mistakes:
        """These mistakes with their (uint8) images taken by ``indices`` from ``data``, the set
        they came from. Raises DataError if ``data`` is another set (its labels there differ)."""
        indices = self.indices.long()
        if len(indices) and (
            int(indices.max()) >= len(data) or not torch.equal(data.labels[indices], self.labels)
        ):
            raise DataError(
                f"the {len(data):,} test images are not the ones analysed (other labels at the "
                f"recorded indices): pass {option('data', 'PATH')} naming the run's data set"
            )
        return replace(self, images=data.images[indices], normalized=False)


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


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], *, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(probabilities (N, classes), labels (N,)) on the CPU, in the loader's order, eval mode."""
    device = torch.device(device)
    model.eval()
    probs, targets = [], []
    for images, labels in loader:
        images = images.to(device, non_blocking=True, memory_format=torch.contiguous_format)
        labels = labels.to(device, non_blocking=True)
        probs.append(model(images).float().softmax(1).cpu())
        targets.append(labels.cpu())
    return torch.cat(probs), torch.cat(targets)


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
    return predict(model, batch_bar(loader, desc="predict", progress=progress), device=device)


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


# --- a trained run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """The best epoch of a run folder, rebuilt: its config, classes and model (eval mode); or an
    untrained model (``folder`` None, epoch 0)."""

    folder: Path | None
    config: Config
    classes: tuple[str, ...]
    model: nn.Module
    epoch: int
    test_acc: float


def load_trained_model(folder: str | Path) -> TrainedModel:
    """Rebuild ``folder/best.pt``'s model on the CPU. Raises RunFileError with the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFileError(
            f"run folder {folder} does not exist: train one with {train_command(folder)}"
        )
    path = folder / BEST
    state = load_checkpoint(path, needs=BEST_KEYS)
    config = Config.from_dict(state["config"])
    classes = state["classes"]
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: its classes are not a list of names; train the run again")
    with torch.device("meta"):  # shapes only: a forged list of classes allocates nothing
        check_weights(build_model(config, len(classes)).state_dict(), state, path)
    model = build_model(config, len(classes))
    load_weights(model, state, path)
    return TrainedModel(
        folder, config, tuple(state["classes"]), model.eval(), state["epoch"], state["test_acc"]
    )


def untrained_model(config: Config, classes: Sequence[str]) -> TrainedModel:
    """``config``'s model with fresh weights from its seed, as a TrainedModel of epoch 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, len(classes)).eval()
    return TrainedModel(None, config, tuple(classes), model, 0, math.nan)


def load_test_set(run: TrainedModel, data: str | None = None) -> ImageSet:
    """The run's test set: same data source and test subset as its config, unless ``data``
    names another source (the subset size and seed stay the run's)."""
    config = run.config if data is None else run.config.replace(data=str(data))
    return load_datasets(config)[1]


def recorded_test_set(config: Config, data: str | None = None) -> ImageSet:
    """The test set of a run's ``config`` (or of the ``data`` source instead), without a
    download: torchvision's CIFAR-10, the default source, only if ./data already holds it.
    Raises DataError, with the fix, when the data is not there."""
    config = config if data is None else config.replace(data=str(data))
    # The folder torchvision's CIFAR10 unpacks into ./data (load_cifar10's default root).
    if config.data is None and not (Path("data") / "cifar-10-batches-py").is_dir():
        raise DataError(f"CIFAR-10 is not downloaded into ./data: {data_hint()}")
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
        """The four figures, keyed like :data:`FIGURE_NAMES`; without "misclassified" while the
        mistakes have no images (a report read from a file, before :meth:`with_images`)."""
        suffix = f"\n{caption}" if caption else ""
        figures = {}
        if self.mistakes.images is not None:
            figures["misclassified"] = plot_misclassified(self.mistakes, self.classes)
        return figures | {
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

    def with_images(self, test_set: ImageSet) -> Report:
        """This report with its misclassified images looked up in ``test_set``, the set it was
        measured on. Raises DataError if ``test_set`` is another one."""
        if len(test_set) != int(self.matrix.sum()):
            raise DataError(
                f"the test set has {len(test_set):,} images, the analysed one "
                f"{int(self.matrix.sum()):,}: pass {option('data', 'PATH')} naming the run's data "
                "set"
            )
        return replace(self, mistakes=self.mistakes.with_images(test_set))

    def to_dict(self) -> dict[str, Any]:
        """The numbers as JSON-ready values, rounded to :data:`REPORT_DECIMALS`. No pixels: the
        mistakes are test-set indices with their labels, predictions and confidences."""
        digits = REPORT_DECIMALS
        return {
            "classes": list(self.classes),
            "confusion_matrix": self.matrix.tolist(),
            # JSON has no NaN: a class without images is null
            "per_class_accuracy": [
                None if math.isnan(a) else round(a, digits["accuracy"])
                for a in self.accuracy.tolist()
            ],
            "mistakes": {
                "indices": self.mistakes.indices.tolist(),
                "labels": self.mistakes.labels.tolist(),
                "predicted": self.mistakes.predicted.tolist(),
                "confidence": [
                    round(c, digits["confidence"]) for c in self.mistakes.confidence.tolist()
                ],
            },
            "erf": {
                "layer": self.erf_layer,
                "field": asdict(self.erf_field),
                "untrained": [
                    [round(v, digits["erf"]) for v in row] for row in self.erf_untrained.tolist()
                ],
                "trained": [
                    [round(v, digits["erf"]) for v in row] for row in self.erf_trained.tolist()
                ],
            },
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Report:
        """The report :meth:`to_dict` described; its mistakes come back without images."""
        mistakes, erf = values["mistakes"], values["erf"]
        accuracy = [math.nan if a is None else a for a in values["per_class_accuracy"]]
        field = {k: tuple(v) if isinstance(v, list) else v for k, v in erf["field"].items()}
        return cls(
            classes=tuple(values["classes"]),
            matrix=torch.tensor(values["confusion_matrix"], dtype=torch.int64),
            accuracy=torch.tensor(accuracy, dtype=torch.float64),
            mistakes=Mistakes(
                images=None,
                labels=torch.tensor(mistakes["labels"], dtype=torch.int64),
                predicted=torch.tensor(mistakes["predicted"], dtype=torch.int64),
                confidence=torch.tensor(mistakes["confidence"], dtype=torch.float32),
                indices=torch.tensor(mistakes["indices"], dtype=torch.int64),
            ),
            erf_layer=erf["layer"],
            erf_field=RFRow(**field),
            erf_untrained=torch.tensor(erf["untrained"], dtype=torch.float32),
            erf_trained=torch.tensor(erf["trained"], dtype=torch.float32),
        )


def _to_json(value: Any, indent: str = "") -> str:
    """JSON with one line per key and per matrix row, so that a committed report diffs well."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(key)}: {_to_json(item, inner)}" for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value and isinstance(value[0], list):
        rows = [inner + _to_json(row, inner) for row in value]
        return "[\n" + ",\n".join(rows) + f"\n{indent}]"
    return json.dumps(value)


def save_report(report: Report, path: str | Path, caption: str = "") -> Path:
    """Write ``report``'s numbers and the figures' ``caption`` as JSON (tens of kB for CIFAR-10,
    no pixels), for :func:`load_report` and the ``figures`` command to redraw the figures."""
    path = Path(path)
    values = {"format": REPORT_FORMAT, "caption": caption, **report.to_dict()}
    atomic_write_text(path, _to_json(values) + "\n")
    return path


def load_report(path: str | Path) -> tuple[Report, str]:
    """(report, caption) from a file :func:`save_report` wrote; the report's mistakes have no
    images until :meth:`Report.with_images`. Raises RunFileError for an unusable file."""
    path = Path(path)
    values = read_json(path, "python -m eva_utils analyze runs/NAME writes one")
    if not isinstance(values, dict) or values.get("format") != REPORT_FORMAT:
        raise RunFileError(
            f"{path} is not an eva8 {REPORT_NAME} (format {REPORT_FORMAT}): write it again with "
            "python -m eva_utils analyze runs/NAME"
        )
    try:
        return Report.from_dict(values), str(values.get("caption", ""))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise RunFileError(
            f"{path} is not a complete {REPORT_NAME} ({error.__class__.__name__}: {error}): "
            "write it again with python -m eva_utils analyze runs/NAME"
        ) from None


def untrained_like(run: TrainedModel) -> nn.Module:
    """The run's architecture with fresh weights drawn from the run's seed (the global random
    state is left as it was)."""
    return untrained_model(run.config, run.classes).model


def analyze(
    run: TrainedModel,
    test_set: ImageSet,
    *,
    device: torch.device | str = "cpu",
    erf_images: int = ERF_IMAGES,
    erf_layer: str | None = None,
    progress: bool = False,
) -> Report:
    """Evaluate ``run`` on ``test_set`` and measure its effective receptive field, and an
    untrained twin's, on the first ``erf_images`` test images. Raises CheckpointError when
    ``test_set``'s classes are not the run's (other names, or the same in another order)."""
    trained_on = run.folder / BEST if run.folder is not None else "the model"
    check_classes(
        trained_on,
        run.classes,
        test_set.classes,
        f"analyze it with the run's own data ({option('data', 'PATH')})",
    )
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
