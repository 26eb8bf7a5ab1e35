"""The held-out validation split (``val_size``): taken out of the training images, class-balanced
and seeded, never trained on; best.pt and the summary follow it and say so; a split that leaves
nothing to train on is one line."""

from __future__ import annotations

import json

import pytest
import torch

from eva_utils import Config, compare, get_preset, runfolder, summarize_history, sweep
from eva_utils.cli import main
from eva_utils.config import recipe_name
from eva_utils.data import CIFAR10_CLASSES, ImageSet, split_validation
from eva_utils.errors import ConfigError, RunFileError
from eva_utils.results import read_recorded_run
from eva_utils.runfolder import BEST, METRICS, RunFolder
from eva_utils.state import TrainingState

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(
    data="synthetic", train_size=40, test_size=10, batch_size=8, max_batches=1, device="cpu",
    epochs=1, arch="tiny",
)  # fmt: skip


def numbered_images(size: int) -> ImageSet:
    """``size`` images whose first two pixels spell their index, labels 0, 1, ..., 9, 0, ..."""
    images = torch.zeros(size, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(size) % 256
    images[:, 0, 0, 1] = torch.arange(size) // 256
    return ImageSet(images, torch.arange(size) % 10, CIFAR10_CLASSES)


def ids(dataset: ImageSet | torch.Tensor) -> list[int]:
    """The indices that :func:`numbered_images` wrote into images (N, 3, H, W)."""
    images = (dataset if isinstance(dataset, torch.Tensor) else dataset.images).cpu().long()
    return (images[:, 0, 0, 0] + 256 * images[:, 0, 0, 1]).tolist()


def test_validation_split_is_disjoint_from_the_training_images_and_class_balanced():
    train_set = numbered_images(500)
    kept, held_out = split_validation(train_set, 75, seed=3)
    assert len(held_out) == 75 and len(kept) == 425
    assert set(ids(kept)).isdisjoint(ids(held_out))
    assert sorted(ids(kept) + ids(held_out)) == list(range(500))
    assert sorted(held_out.class_counts()) == [7] * 5 + [8] * 5  # 75 = 7 per class, 5 left over
    assert ids(kept) == sorted(ids(kept))  # the images trained on keep their order
    again, other = split_validation(train_set, 75, seed=3)[1], split_validation(train_set, 75, 4)[1]
    assert ids(again) == ids(held_out) and set(ids(other)) != set(ids(held_out))


def test_a_run_with_val_size_never_trains_on_its_validation_split():
    train_set, test_set = numbered_images(40), numbered_images(10)
    config = get_preset("session8").replace(**TINY, val_size=12)
    state = TrainingState(config, (train_set, test_set), progress=False)
    assert len(state.val_set) == 12 and len(state.train_set) == 28
    assert set(ids(state.train_set)).isdisjoint(ids(state.val_set))
    trained_on = ids(state.train_loader.loader.images)  # what the epochs draw batches from
    assert sorted(trained_on) == sorted(ids(state.train_set))


def test_without_val_size_nothing_is_held_out():
    train_set, test_set = numbered_images(40), numbered_images(10)
    state = TrainingState(get_preset("session8").replace(**TINY), (train_set, test_set), False)
    assert state.val_set is None and ids(state.train_set) == list(range(40))


def rows(val_accs: list[float] | None, test_accs: list[float]) -> list[dict]:
    history = []
    for epoch, test_acc in enumerate(test_accs, 1):
        row = dict(epoch=epoch, train_loss=1.0, train_acc=0.5, test_loss=1.0, test_acc=test_acc,
                   lr=0.1, seconds=1.0)  # fmt: skip
        if val_accs is not None:
            row.update(val_loss=1.0, val_acc=val_accs[epoch - 1])
        history.append(row)
    return history


def save_epochs(folder, history: list[dict]) -> None:
    """Save each epoch of ``history`` into ``folder`` as a run does, the weights saying which
    epoch they are."""
    config = Config(**TINY, val_size=10).to_dict()
    for epoch in range(1, len(history) + 1):
        state = {"config": config, "classes": list(CIFAR10_CLASSES),
                 "model": {"epoch": torch.tensor(epoch)}, "history": history[:epoch]}  # fmt: skip
        folder.save(state, {})


def test_best_checkpoint_follows_validation_accuracy_not_test_accuracy(tmp_path):
    # validation peaks at epoch 2, the test set at epoch 3: best.pt must be epoch 2
    history = rows(val_accs=[0.5, 0.8, 0.6], test_accs=[0.5, 0.6, 0.9])
    with RunFolder.open(tmp_path / "run") as folder:
        save_epochs(folder, history)
    best = runfolder.load_checkpoint(tmp_path / "run" / BEST)
    assert (best["epoch"], int(best["model"]["epoch"])) == (2, 2)
    assert (best["best_on"], best["val_acc"], best["test_acc"]) == ("validation", 0.8, 0.6)
    summary = summarize_history(history)
    assert (summary["best_epoch"], summary["best_acc"], summary["best_val_acc"]) == (2, 0.6, 0.8)


def test_best_checkpoint_without_a_validation_split_follows_test_accuracy(tmp_path):
    with RunFolder.open(tmp_path / "run") as folder:
        save_epochs(folder, rows(None, test_accs=[0.5, 0.6, 0.9]))
    best = runfolder.load_checkpoint(tmp_path / "run" / BEST)
    assert (best["epoch"], best["best_on"], best["test_acc"]) == (3, "test", 0.9)


def test_summary_and_metrics_say_what_best_was_chosen_on(tmp_path):
    assert summarize_history(rows([0.5, 0.8], [0.5, 0.6]))["best_on"] == "validation"
    assert summarize_history(rows(None, [0.5, 0.6]))["best_on"] == "test"
    with RunFolder.open(tmp_path / "run") as folder:
        save_epochs(folder, rows([0.5, 0.8], [0.5, 0.6]))
    assert json.loads((tmp_path / "run" / METRICS).read_text())["best_on"] == "validation"
    # a recorded run from before val_size: no val fields, best chosen on the test set
    old = read_recorded_run(ROOT / "results" / "session8-h100")
    assert "best_on" not in old.metrics and "val_acc" not in old.history[0]
    assert (old.summary()["best_on"], old.summary()["best_val_acc"]) == ("test", None)


def test_a_val_size_that_leaves_nothing_to_train_on_is_one_line(tmp_path, capsys):
    flags = ["--data", "synthetic", "--train-size", "16", "--test-size", "10", "--batch-size",
             "8", "--max-batches", "1", "--device", "cpu", "--quiet", "--arch", "tiny",
             "--epochs", "1"]  # fmt: skip
    code = main(["train", "--out", str(tmp_path / "run"), *flags, "--val-size", "16"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "val_size (16) must be smaller than the 16 training images" in lines[0]
    assert "lower --val-size" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was left behind


@pytest.mark.parametrize("value", [0, -5, True, 2.5])
def test_val_size_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"^val_size must be a positive integer"):
        Config(val_size=value)


def test_run_folder_names_without_val_size_are_the_names_from_before_it():
    """A sweep finds its old runs again: these names were computed before val_size existed."""
    small = get_preset("session8").replace(data="synthetic", train_size=5000, test_size=1000)
    assert recipe_name(small.replace(epochs=3)) == "gbn2-dropout0.1-5000img-267076f4"
    assert recipe_name(get_preset("fast")) == "bn-dropout0-all-1d378311"
    assert recipe_name(get_preset("fast").replace(val_size=5000)) != "bn-dropout0-all-1d378311"


def test_a_sweep_over_val_size_summarises_and_compares_with_runs_without_it(tmp_path):
    base = get_preset("session8").replace(**{**TINY, "train_size": 24, "epochs": 1})
    summary = sweep(base, {"val_size": [None, 8]}, [1], out=tmp_path, progress=False)
    assert summary["varied"] == ["val_size"] and len(summary["cells"]) == 2
    folders = sorted(path.parent for path in tmp_path.glob(f"*/{METRICS}"))
    runs = [read_recorded_run(folder) for folder in folders]
    assert sorted(run.summary()["best_on"] for run in runs) == ["test", "validation"]
    _, table = compare(*folders)
    assert len(table.splitlines()) == 3


def test_a_metrics_json_with_a_damaged_val_acc_is_refused_in_one_line(tmp_path):
    with RunFolder.open(tmp_path / "run") as folder:
        save_epochs(folder, rows([0.5, 0.8], [0.5, 0.6]))
    path = tmp_path / "run" / METRICS
    metrics = json.loads(path.read_text())
    metrics["history"][1]["val_acc"] = 80.0  # a percentage, not a fraction
    path.write_text(json.dumps(metrics))
    with pytest.raises(
        RunFileError, match=r"val_acc of epoch 2 is 80.0, not a fraction in \[0, 1\]"
    ):
        runfolder.read_metrics(path)
