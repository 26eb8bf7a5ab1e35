"""Analysis of a trained model: hand-checked counts, and the analyze command end to end."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from eva_utils.analysis import (
    confusion_matrix,
    find_mistakes,
    misclassified,
    per_class_accuracy,
    plot_confusion_matrix,
    plot_misclassified,
    plot_per_class_accuracy,
    predictions,
)
from eva_utils.cli import main
from eva_utils.data import synthetic_cifar10
from eva_utils.loaders import DeviceLoader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("misclassified.png", "confusion_matrix.png", "per_class_accuracy.png", "erf.png")
# true:      0  0  1  2  2  2
# predicted: 0  1  1  2  0  2
LABELS = torch.tensor([0, 0, 1, 2, 2, 2])
PREDICTED = torch.tensor([0, 1, 1, 2, 0, 2])
HAND_MATRIX = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10),
    ).eval()  # fmt: skip


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    assert torch.equal(confusion_matrix(PREDICTED, LABELS, 3), HAND_MATRIX)


def test_per_class_accuracy_is_the_diagonal_over_the_row():
    expected = torch.tensor([1 / 2, 1 / 1, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(per_class_accuracy(HAND_MATRIX), expected)


def test_per_class_accuracy_of_a_class_without_images_is_nan():
    accuracy = per_class_accuracy(confusion_matrix(torch.tensor([0]), torch.tensor([0]), 2))
    assert accuracy[0] == 1 and math.isnan(accuracy[1])


def test_find_mistakes_keeps_wrong_predictions_most_confident_first():
    probabilities = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 1, 0])
    images = torch.arange(4).view(4, 1, 1, 1)
    mistakes = find_mistakes(probabilities, labels, images)
    assert mistakes.indices.tolist() == [3, 1]  # 0.7 before 0.6; images 0 and 2 are right
    assert mistakes.images.flatten().tolist() == [3, 1]
    assert mistakes.predicted.tolist() == [1, 1] and mistakes.labels.tolist() == [0, 0]
    torch.testing.assert_close(mistakes.confidence, torch.tensor([0.7, 0.6]))


def test_misclassified_from_an_imageset_returns_its_uint8_images():
    _, test_set = synthetic_cifar10(8, 40)
    model = tiny_classifier()
    probs, labels = predictions(model, test_set)
    mistakes = misclassified(model, test_set)
    wrong = probs.argmax(1) != labels
    assert len(mistakes) == int(wrong.sum()) > 0
    assert mistakes.images.dtype == torch.uint8 and not mistakes.normalized
    assert torch.equal(mistakes.images, test_set.images[mistakes.indices])


def test_misclassified_from_a_loader_agrees_with_the_imageset():
    _, test_set = synthetic_cifar10(8, 40)
    model = tiny_classifier()
    from_loader = misclassified(model, DeviceLoader(test_set, 16))
    from_set = misclassified(model, test_set)
    assert from_loader.normalized and from_loader.images.dtype == torch.float32
    assert torch.equal(from_loader.indices, from_set.indices)


def test_plots_return_figures_with_counts_and_titles():
    classes = ("a", "b", "c")
    matrix_fig = plot_confusion_matrix(HAND_MATRIX, classes)
    counts = [t.get_text() for t in matrix_fig.axes[0].texts]
    assert counts == [str(v) for v in HAND_MATRIX.flatten().tolist()]
    bars = plot_per_class_accuracy(per_class_accuracy(HAND_MATRIX), classes, overall=4 / 6)
    assert [round(p.get_height(), 2) for p in bars.axes[0].patches] == [50.0, 100.0, 66.67]
    mistakes = find_mistakes(
        torch.eye(3)[PREDICTED], LABELS, torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    )
    gallery = plot_misclassified(mistakes, classes)
    assert isinstance(gallery, Figure)
    assert [ax.get_title() for ax in gallery.axes] == ["a →\nb (100%)", "c →\na (100%)"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A ResNet18 trained for 2 batches on synthetic data, as the README's smoke run."""
    out = tmp_path_factory.mktemp("analyze") / "run"
    with torch.random.fork_rng(devices=[]):
        code = main([
            "train", "--data", "synthetic", "--train-size", "64", "--test-size", "32",
            "--epochs", "1", "--batch-size", "32", "--max-batches", "2", "--out", str(out),
            "--quiet",
        ])  # fmt: skip
    assert code == 0
    return out


def test_analyze_writes_four_valid_pngs(tiny_run, tmp_path, capsys):
    code = main(["analyze", str(tiny_run), "--out", str(tmp_path), "--erf-images", "8", "--quiet"])
    assert code == 0
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    assert "test accuracy" in capsys.readouterr().out


def test_analyze_writes_into_the_run_folder_by_default(tiny_run):
    assert main(["analyze", str(tiny_run), "--erf-images", "4", "--quiet"]) == 0
    assert all((tiny_run / name).is_file() for name in FIGURES)


@pytest.mark.parametrize("make", ["missing folder", "no checkpoint"])
def test_analyze_without_a_checkpoint_is_a_one_line_error(make, tmp_path, capsys):
    folder = tmp_path / "run"
    if make == "no checkpoint":
        folder.mkdir()
    assert main(["analyze", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eva8: error:") and len(err.splitlines()) == 1
    assert str(folder) in err


def test_analyze_refuses_the_same_classes_in_another_order():
    from eva_utils import get_preset
    from eva_utils.analysis import analyze, untrained_model
    from eva_utils.data import ImageSet
    from eva_utils.errors import CheckpointError

    test_set = synthetic_cifar10(train_size=8, test_size=10)[1]
    run = untrained_model(get_preset("session8"), test_set.classes)
    shuffled = ImageSet(test_set.images, test_set.labels, test_set.classes[::-1])
    with pytest.raises(CheckpointError, match=r"the data has \['truck', 'ship'.*own data"):
        analyze(run, shuffled, erf_images=2)
