"""Both notebooks from a fresh clone on the hosts students use, faked offline: Kaggle (its
kernels' environment variable, ``/kaggle/working`` and ``/kaggle/input`` in a temporary folder)
and, for the receptive-field notebook, Colab. (The main notebook as in Colab, its clone failure
and its Drive: tests/test_notebooks.py and tests/test_colab_drive.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from .test_notebooks import (
    MAIN,
    ROOT,
    code_cells,
    colab_environment,
    kaggle_environment,
    run_notebook,
    stored_text,
)

RECEPTIVE = ROOT / "notebooks" / "receptive_fields.ipynb"
ENVIRONMENTS = {"colab": colab_environment, "kaggle": kaggle_environment}


def hosted_copy(path: Path, folder: Path) -> Path:
    """The notebook as the host opens it, with a last cell saying where it ran from; the
    receptive-field notebook on synthetic data (no CIFAR-10 offline)."""
    notebook = nbformat.read(path, 4)
    if path == RECEPTIVE:
        parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        parameters.source += (
            '\nDATA = "synthetic"  # injected by the test: no CIFAR-10 offline'
            "\nTEST_SIZE = 64  # injected by the test: the mechanics, not the figures"
        )
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import os\nprint('imported from', eva_utils.__file__)\nprint('working in', os.getcwd())"
    ))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / path.name)
    return folder / path.name


def executed(folder: Path) -> str:
    cells = nbformat.read(folder / "executed.ipynb", 4).cells
    return "\n".join(stored_text(c) for c in cells if c.cell_type == "code")


def test_main_notebook_runs_as_on_kaggle_from_a_fresh_clone_with_an_added_data_set(tmp_path):
    """The setup cell clones into /kaggle/working and runs from there; DATA = None takes the
    CIFAR-10 added as an input (smoke mode then replaces it with synthetic data, and says so)."""
    data = tmp_path / "kaggle" / "input" / "cifar10-jpg"
    for split in ("train", "test"):
        (data / split / "airplane").mkdir(parents=True)
    copy = hosted_copy(MAIN, tmp_path / "upload")
    done = run_notebook(copy, copy.parent, kaggle_environment(tmp_path, ROOT.as_uri()))
    assert done.returncode == 0, done.stderr[-3000:]
    text = executed(copy.parent)
    clone = tmp_path / "kaggle" / "working" / "eva8"
    assert f"imported from {tmp_path / 'site' / 'eva_utils' / '__init__.py'}" in text
    assert f"working in {clone / 'notebooks'}" in text  # run folders: under /kaggle/working
    assert f"Kaggle: CIFAR-10 from this notebook's input {data}" in text
    assert f"override: data = 'synthetic' (the cell says '{data}')" in text
    assert "session8-h100" in text and (clone / "results" / "session8-h100").is_dir()


@pytest.mark.parametrize("host", ["colab", "kaggle"])
def test_receptive_field_notebook_runs_from_a_fresh_clone_on_the_host(tmp_path, host):
    copy = hosted_copy(RECEPTIVE, tmp_path / "upload")
    done = run_notebook(copy, copy.parent, ENVIRONMENTS[host](tmp_path, ROOT.as_uri()))
    assert done.returncode == 0, done.stderr[-3000:]
    text = executed(copy.parent)
    assert f"imported from {tmp_path / 'site' / 'eva_utils' / '__init__.py'}" in text
    assert "test images: " in text and "model: an UNTRAINED session8 ResNet18" in text


def test_kaggle_setup_says_to_turn_the_internet_on_when_the_clone_fails(tmp_path):
    setup = nbformat.v4.new_notebook(cells=[code_cells(MAIN)[0]])
    setup.metadata = nbformat.read(MAIN, 4).metadata
    (tmp_path / "upload").mkdir()
    nbformat.write(setup, tmp_path / "upload" / "setup.ipynb")
    nowhere = (tmp_path / "no-such-repository").as_uri()
    env = kaggle_environment(tmp_path, nowhere)
    done = run_notebook(tmp_path / "upload" / "setup.ipynb", tmp_path / "upload", env)
    assert done.returncode != 0
    assert (
        f"could not clone {nowhere}: turn the Internet on (Settings > Internet, in the notebook's "
        "side panel), then run this cell again"
    ) in done.stderr
    assert not os.path.exists(env["EVA8_CLONE"])
