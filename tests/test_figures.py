"""Figures from committed numbers: analysis.json round trip, and the figures command end to end
(byte-identical PNGs, no pixels in the JSON, the gallery skipped when the data set is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from eva_utils.analysis import (
    REPORT_DECIMALS,
    Report,
    find_mistakes,
    load_report,
    per_class_accuracy,
    save_report,
)
from eva_utils.cli import main
from eva_utils.data import ImageSet
from eva_utils.errors import DataError
from eva_utils.receptive_fields import RFRow

HISTORY_PNGS = {"validation_loss.png", "validation_accuracy.png"}
ANALYSIS_PNGS = {"misclassified.png", "confusion_matrix.png", "per_class_accuracy.png", "erf.png"}
REPORT_KEYS = {
    "format", "caption", "classes", "confusion_matrix", "per_class_accuracy", "mistakes", "erf",
}  # fmt: skip
FIELD = RFRow(
    name="layer4", type="Sequential", output_shape=(512, 4, 4), kernel=None, stride=None,
    padding=None, jump=(8, 8), rf=(109, 109), start=(0.0, 0.0),
)  # fmt: skip


def hand_report(num_classes: int = 3, size: int = 12) -> tuple[Report, ImageSet]:
    """A report with every kind of value (a class without images, so a NaN accuracy; mistakes;
    float32 ERF maps with more decimals than the file keeps), and the test set it describes."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes - 1, (size,), generator=generator)  # last class: none
    probabilities = torch.rand(size, num_classes, generator=generator).softmax(1)
    images = torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=generator)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    matrix.index_put_((labels, probabilities.argmax(1)), torch.tensor(1), accumulate=True)
    classes = tuple(f"class{i}" for i in range(num_classes))
    report = Report(
        classes=classes,
        matrix=matrix,
        accuracy=per_class_accuracy(matrix),
        mistakes=find_mistakes(probabilities, labels, images),
        erf_layer="layer4",
        erf_field=FIELD,
        erf_untrained=torch.rand(8, 8, generator=generator),
        erf_trained=torch.rand(8, 8, generator=generator),
    )
    return report, ImageSet(images, labels, classes)


def test_report_round_trip_keeps_every_number(tmp_path):
    report, _ = hand_report()
    assert len(report.mistakes) > 0 and report.accuracy.isnan().any()
    loaded, caption = load_report(save_report(report, tmp_path / "analysis.json", "a caption"))
    assert caption == "a caption"
    assert loaded.classes == report.classes and loaded.erf_layer == report.erf_layer
    assert loaded.erf_field == report.erf_field
    assert_close(loaded.matrix, report.matrix, rtol=0, atol=0)
    assert_close(loaded.accuracy, report.accuracy, rtol=0, atol=1e-6, equal_nan=True)
    for name in ("indices", "labels", "predicted"):
        assert_close(getattr(loaded.mistakes, name), getattr(report.mistakes, name), rtol=0, atol=0)
    atol = 0.5 * 10 ** -REPORT_DECIMALS["erf"] + 1e-7
    assert_close(loaded.mistakes.confidence, report.mistakes.confidence, rtol=0, atol=atol)
    assert_close(loaded.erf_untrained, report.erf_untrained, rtol=0, atol=atol)
    assert_close(loaded.erf_trained, report.erf_trained, rtol=0, atol=atol)


def test_report_read_back_gets_its_images_by_index_from_the_test_set(tmp_path):
    report, test_set = hand_report()
    loaded, _ = load_report(save_report(report, tmp_path / "analysis.json"))
    assert loaded.mistakes.images is None and "misclassified" not in loaded.figures()
    found = loaded.with_images(test_set)
    assert torch.equal(found.mistakes.images, report.mistakes.images)
    assert "misclassified" in found.figures()


@pytest.mark.parametrize("other", ["other labels", "other size"])
def test_report_refuses_another_test_set(other, tmp_path):
    report, test_set = hand_report()
    loaded, _ = load_report(save_report(report, tmp_path / "analysis.json"))
    if other == "other labels":
        test_set = ImageSet(test_set.images, (test_set.labels + 1) % 3, test_set.classes)
    else:
        test_set = test_set.subset(torch.arange(len(test_set) - 1))
    with pytest.raises(DataError, match="data=PATH"):  # library words: not a CLI flag
        loaded.with_images(test_set)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A result folder as committed: metrics.json of a 2-batch synthetic run, and the
    analysis.json (with its four PNGs) that analyze wrote."""
    root = tmp_path_factory.mktemp("figures")
    run, res = root / "run", root / "res"
    with torch.random.fork_rng(devices=[]):
        assert main([
            "train", "--data", "synthetic", "--train-size", "64", "--test-size", "32",
            "--epochs", "1", "--batch-size", "32", "--max-batches", "2", "--out", str(run),
            "--quiet",
        ]) == 0  # fmt: skip
    assert main(["analyze", str(run), "--out", str(res), "--erf-images", "4", "--quiet"]) == 0
    shutil.copy(run / "metrics.json", res / "metrics.json")
    return res


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_analysis_json_holds_numbers_not_pixels(result):
    path = result / "analysis.json"
    values = json.loads(path.read_text())
    assert set(values) == REPORT_KEYS
    assert set(values["mistakes"]) == {"indices", "labels", "predicted", "confidence"}
    assert set(values["erf"]) == {"layer", "field", "untrained", "trained"}
    assert all(len(v) == len(values["mistakes"]["indices"]) for v in values["mistakes"].values())
    assert all(isinstance(i, int) for i in values["mistakes"]["indices"])
    # the maps are the input's height x width (one value per position, no channels)
    assert [len(values["erf"]["trained"]), len(values["erf"]["trained"][0])] == [32, 32]
    assert path.stat().st_size < 40_000


def test_figures_redraws_six_identical_pngs_and_writes_only_into_out(result, tmp_path, capsys):
    before = snapshot(result)
    assert main(["figures", str(result), "--out", str(tmp_path / "a")]) == 0
    assert "wrote" in capsys.readouterr().out
    # a second process, as `make figures` is
    command = [sys.executable, "-m", "eva_utils", "figures", str(result), "--out", tmp_path / "b"]
    subprocess.run(command, check=True, capture_output=True)
    first, second = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert set(first) == HISTORY_PNGS | ANALYSIS_PNGS
    assert first == second
    # analyze drew its PNGs from the same saved numbers
    assert all(first[name] == before[name] for name in ANALYSIS_PNGS)
    assert snapshot(result) == before
    assert {p.name for p in tmp_path.iterdir()} == {"a", "b"}


def test_figures_without_the_data_set_skips_only_the_gallery(result, tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    (out / "misclassified.png").write_bytes(b"the committed gallery")
    code = main(["figures", str(result), "--out", str(out), "--data", str(tmp_path / "missing")])
    assert code == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "misclassified.png" in err and "--data PATH" in err
    assert (out / "misclassified.png").read_bytes() == b"the committed gallery"
    assert {p.name for p in out.iterdir()} == HISTORY_PNGS | ANALYSIS_PNGS


def test_figures_never_downloads_cifar10(result, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "result"
    shutil.copytree(result, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["config"]["data"] = None  # torchvision's CIFAR-10, downloaded into ./data
    (folder / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.chdir(tmp_path)
    assert main(["figures", str(folder), "--out", str(tmp_path / "images")]) == 0
    err = capsys.readouterr().err
    assert "not downloaded into ./data" in err and "--data PATH" in err
    assert not (tmp_path / "data").exists()


def test_figures_without_analysis_json_draws_the_history(result, tmp_path, capsys):
    folder = tmp_path / "result"
    folder.mkdir()
    shutil.copy(result / "metrics.json", folder)
    assert main(["figures", str(folder), "--out", str(tmp_path / "images")]) == 0
    assert {p.name for p in (tmp_path / "images").iterdir()} == HISTORY_PNGS
    assert "analyze" in capsys.readouterr().out
