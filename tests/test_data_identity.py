"""The data a run trains on is known by what it is, not by the text that named it: a run made
with ``--data ../tiny.tar.gz`` resumes from another folder with or without ``--data``, the same
archive copied elsewhere is the same recipe, and a sweep rerun from another folder finds its
runs (issue 25, item 7). A different archive is still another recipe."""

from __future__ import annotations

import shutil

import pytest

from eva_utils import get_preset
from eva_utils.config import data_identity, recipe_name, same_data
from eva_utils.errors import CheckpointError
from eva_utils.runfolder import METRICS, check_same_recipe, read_metrics
from eva_utils.sweeps import plan

from .conftest import fake_checkpoint, run_cli, write_archive, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"train_size": 6, "test_size": 3, "batch_size": 6, "max_batches": 1, "device": "cpu",
        "arch": "tiny"}  # fmt: skip
TINY_FLAGS = [
    "--train-size", "6", "--test-size", "3", "--batch-size", "6", "--max-batches", "1",
    "--device", "cpu", "--quiet", "--arch", "tiny",
]  # fmt: skip


def test_a_run_made_with_a_relative_archive_resumes_from_another_folder(tmp_path, tiny_archive):
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for folder in (first, second, third):
        folder.mkdir()
    made = run_cli(
        "train", "--data", "../tiny.tar.gz", "--epochs", "1", "--out", "run", *TINY_FLAGS,
        cwd=first,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    recorded = read_metrics(first / "run" / METRICS)["config"]["data"]
    assert recorded == str(tiny_archive.resolve())  # found again from any folder

    # From another folder, without --data: the recorded path still leads to the archive.
    without = run_cli("train", "--resume", "../first/run", "--epochs", "2", *TINY_FLAGS[-3:],
                      cwd=second)  # fmt: skip
    assert without.returncode == 0, without.stderr
    # With --data as another folder's text for the same archive: the same recipe.
    with_data = run_cli(
        "train", "--resume", "../first/run", "--epochs", "3", "--data", "../third/../tiny.tar.gz",
        *TINY_FLAGS, cwd=third,
    )  # fmt: skip
    assert with_data.returncode == 0, with_data.stderr
    assert [row["epoch"] for row in read_metrics(first / "run" / METRICS)["history"]] == [1, 2, 3]


def test_the_same_archive_anywhere_is_one_recipe_and_another_archive_is_not(tmp_path, tiny_archive):
    copy = tmp_path / "elsewhere" / "renamed.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(tiny_archive, copy)
    other = write_archive(write_image_folder(tmp_path / "other", per_class=6), tmp_path / "o.tgz")
    config = get_preset("session8").replace(**TINY, data=str(tiny_archive))

    assert data_identity(str(copy)) == data_identity(str(tiny_archive))
    assert recipe_name(config.replace(data=str(copy))) == recipe_name(config)
    assert recipe_name(config.replace(data=str(other))) != recipe_name(config)
    assert same_data(str(tiny_archive), str(copy)) and not same_data(str(tiny_archive), str(other))
    check_same_recipe(config, config.replace(data=str(copy)), tmp_path)  # no refusal
    with pytest.raises(CheckpointError, match="another recipe.*data"):
        check_same_recipe(config, config.replace(data=str(other)), tmp_path)
    # Folders and the other sources keep their identity as before.
    assert data_identity(str(tmp_path / "tiny")) == str((tmp_path / "tiny").resolve())
    assert data_identity(None) is None and data_identity("synthetic") == "synthetic"


def test_a_sweep_rerun_from_another_folder_finds_its_runs(tmp_path, tiny_archive, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    out, grid = tmp_path / "sweep", {"dropout": [0.0, 0.1]}
    monkeypatch.chdir(tmp_path / "a")
    base = get_preset("session8").replace(**TINY, epochs=2, data="../tiny.tar.gz")
    first = plan(base, grid, [1], out)
    for run in first:
        fake_checkpoint(run.config, run.folder, epochs=1)

    monkeypatch.chdir(tmp_path / "b" / "c")
    again = plan(base.replace(data="../../tiny.tar.gz"), grid, [1], out)
    assert [run.folder for run in again] == [run.folder for run in first]
    assert [run.epochs_done for run in again] == [1, 1]


def test_a_sweep_run_named_by_its_data_path_text_keeps_its_folder(tmp_path, tiny_archive):
    """Runs that an earlier version named from the path's text are found, not trained again."""
    out = tmp_path / "sweep"
    config = get_preset("session8").replace(**TINY, epochs=2, data=str(tiny_archive))
    typed = out / recipe_name(config, data_as_typed=True)
    assert typed != out / recipe_name(config)
    fake_checkpoint(config, typed, epochs=1)
    (run,) = plan(config.replace(seed=1), {}, [config.seed], out)
    assert run.folder == typed and run.epochs_done == 1
