"""Colab runs that survive a recycled runtime: the notebook's ``KEEP_ON_DRIVE`` puts the run
folders on Google Drive (faked: ``google.colab.drive`` links its mount point to a folder that
outlives the runtime's ``/content``), a new runtime resumes the run from there, and the file
layer copes with what such a mount may lack (chmod)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import nbformat
import pytest

from eva_utils import colab, files, notebook
from eva_utils.config import Config
from eva_utils.errors import EvaError
from eva_utils.runfolder import LAST, METRICS

from .test_notebooks import MAIN, ROOT, code_cells, colab_environment, run_notebook, stored_text

TINY = Config(data="synthetic", train_size=32, test_size=16, batch_size=16, epochs=1,
              device="cpu", num_workers=0, arch="tiny")  # fmt: skip


def test_the_parameter_cell_keeps_runs_in_the_runtime_by_default():
    parameters = next(c for c in code_cells(MAIN) if "parameters" in c.metadata.get("tags", []))
    assert "\nKEEP_ON_DRIVE = False  #" in parameters.source
    assert any("keep_on_drive=KEEP_ON_DRIVE" in c.source for c in code_cells(MAIN))


# The cells of the main notebook that a resumed run needs, as Colab runs them: the setup cell,
# the parameters (KEEP_ON_DRIVE switched on), the run folder, the data and the training cell.
NEEDED = ("import eva_utils", "KEEP_ON_DRIVE =", "notebook.run_folder(", "load_datasets(",
          "lesson.train(")  # fmt: skip


def drive_notebook(path: Path) -> Path:
    cells = [next(c for c in code_cells(MAIN) if needle in c.source) for needle in NEEDED]
    cells[1].source += "\nKEEP_ON_DRIVE = True  # injected by the test"
    copy = nbformat.v4.new_notebook(cells=cells, metadata=nbformat.read(MAIN, 4).metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(copy, path)
    return path


def colab_with_drive(tmp_path: Path) -> dict[str, str]:
    """The kernel environment of a Colab runtime with a fake Drive, training a tiny recipe;
    the setup cell finds the clone's folder made (:func:`recycle`) and imports this checkout."""
    env = colab_environment(tmp_path, ROOT.as_uri())
    del env["EVA_SMOKE"]  # a smoke run trains in a temporary folder: this one must persist
    return env | {
        "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        "EVA_DATA": "synthetic", "EVA_TRAIN_SIZE": "32", "EVA_TEST_SIZE": "16",
        "EVA_BATCH_SIZE": "16", "EVA_DEVICE": "cpu",
    }  # fmt: skip


def recycle(tmp_path: Path) -> None:
    """A new runtime: ``/content`` (the clone, its run folders, Drive's mount point) is gone;
    only the clone's folder is there again (cloned, as far as the setup cell can tell)."""
    shutil.rmtree(tmp_path / "content", ignore_errors=True)
    (tmp_path / "content" / "eva8" / "notebooks").mkdir(parents=True)


def executed_text(folder: Path) -> str:
    return "\n".join(map(stored_text, nbformat.read(folder / "executed.ipynb", 4).cells))


def history_on_drive(tmp_path: Path) -> list[dict]:
    runs = list((tmp_path / "google-drive" / "MyDrive" / "eva8" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / LAST).is_file(), runs
    return json.loads((runs[0] / METRICS).read_text())["history"]


def test_a_recycled_runtime_resumes_the_run_kept_on_drive(tmp_path):
    """The notebook with KEEP_ON_DRIVE trains one epoch into the fake Drive; the runtime is
    recycled (``/content`` deleted, the mount with it); the notebook run again in the new
    runtime, for two epochs, continues from the epoch on Drive instead of starting over."""
    path = drive_notebook(tmp_path / "upload" / "drive.ipynb")
    env = colab_with_drive(tmp_path)
    recycle(tmp_path)
    done = run_notebook(path, path.parent, env | {"EVA_EPOCHS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = executed_text(path.parent)
    assert f"Mounted at {tmp_path / 'content' / 'drive'}" in text
    assert f"run folders on Google Drive: {tmp_path / 'content' / 'drive' / 'MyDrive'}" in text
    first = history_on_drive(tmp_path)
    assert [row["epoch"] for row in first] == [1]
    assert not (tmp_path / "content" / "eva8" / "notebooks" / "runs").exists()

    recycle(tmp_path)
    done = run_notebook(path, path.parent, env | {"EVA_EPOCHS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds a checkpoint: continuing that run" in executed_text(path.parent)
    resumed = history_on_drive(tmp_path)
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert resumed[0] == first[0]  # epoch 1 as the first runtime trained it, not trained again


def test_keep_on_drive_off_colab_is_one_line_and_the_runs_stay_here(monkeypatch, capsys):
    monkeypatch.delenv(notebook.SMOKE_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    folder = notebook.run_folder("runs", TINY, keep_on_drive=True)
    assert folder.parent == Path("runs")
    note = capsys.readouterr().out.splitlines()[0]
    assert note == (
        "KEEP_ON_DRIVE applies only on Colab, where Google Drive can be mounted: the run folders "
        "stay in runs on this machine"
    )


def fake_colab(monkeypatch, mount) -> None:
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mount
    package = types.ModuleType("google.colab")
    package.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", package)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)


def test_a_drive_that_will_not_mount_is_one_line_saying_what_to_do(monkeypatch, tmp_path):
    def refused(mountpoint):
        raise ValueError("mount failed: invalid oauth code\n(details)")

    fake_colab(monkeypatch, refused)
    monkeypatch.setenv(colab.DRIVE_MOUNT_ENV, str(tmp_path / "drive"))
    with pytest.raises(EvaError) as error:
        colab.runs_on_drive("runs")
    assert str(error.value) == (
        f"could not mount Google Drive at {tmp_path / 'drive'} (mount failed: invalid oauth "
        "code): allow access when Colab asks, or set KEEP_ON_DRIVE = False to keep the run "
        "folders in this runtime"
    )


def test_drive_mounts_where_colabs_snippet_does_and_a_mount_without_mydrive_is_refused(
    monkeypatch,
):
    mounted = []
    fake_colab(monkeypatch, mounted.append)
    monkeypatch.delenv(colab.DRIVE_MOUNT_ENV, raising=False)
    with pytest.raises(EvaError) as error:
        colab.runs_on_drive("runs")
    assert mounted == ["/content/drive"]  # drive.mount('/content/drive'), as Colab shows it
    assert str(error.value) == (
        "/content/drive has no MyDrive folder after mounting Google Drive: mount it again with "
        "drive.mount('/content/drive', force_remount=True), or set KEEP_ON_DRIVE = False"
    )


def test_an_atomic_write_where_chmod_is_refused_still_writes(monkeypatch, tmp_path):
    """Some FUSE and SMB mounts refuse chmod (EPERM); the file is written all the same."""

    def refused(path, mode, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    files.atomic_write_text(tmp_path / "metrics.json", "{}\n")
    assert (tmp_path / "metrics.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left


def _unmount(run: Path, mount: Path) -> None:
    """A Drive that goes away and leaves its mount point, empty."""
    shutil.rmtree(mount)
    mount.mkdir()


def _replace_by_a_file(run: Path, mount: Path) -> None:
    shutil.rmtree(run)
    run.write_text("not a folder")


def _replace_by_another_folder(run: Path, mount: Path) -> None:
    run.rename(run.with_name("moved"))
    run.mkdir()


@pytest.mark.parametrize(
    "vanish", [_unmount, _replace_by_a_file, _replace_by_another_folder],
    ids=["unmounted", "file", "another-folder"],
)  # fmt: skip
def test_a_run_folder_that_vanishes_mid_run_is_a_one_line_save_error(tmp_path, vanish):
    """After epoch 1 the run folder goes (the Drive unmounted; the folder replaced by a file):
    saving epoch 2 is one line saying so, and no folder is made again in its place."""
    from eva_utils import fit
    from eva_utils.errors import CheckpointError

    mount = tmp_path / "drive"
    run = mount / colab.DRIVE_FOLDER / "runs" / "tiny"
    with pytest.raises(CheckpointError) as error:
        fit(TINY.replace(epochs=2), out=run, progress=False,
            on_epoch=lambda row: vanish(run, mount) if row["epoch"] == 1 else None)  # fmt: skip
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"could not save epoch 2: {run} is no longer the run folder")
    if vanish is _unmount:
        assert list(mount.iterdir()) == []  # nothing written onto the runtime's own disk
    elif vanish is _replace_by_a_file:
        assert run.read_text() == "not a folder"
    else:
        assert list(run.iterdir()) == []  # the new folder is not written into, nor removed
        assert len(json.loads((run.with_name("moved") / METRICS).read_text())["history"]) == 1
