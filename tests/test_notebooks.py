"""The notebooks: thin clients of the library, with checked outputs that nbval compares."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "notebooks" / "session8_resnet18_gbn.ipynb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ASSIGNMENT_TABLE = (Path(__file__).parent / "data" / "assignment_summary.txt").read_text()
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
# What must not appear in a cell: the notebooks call the library, they do not re-implement it.
LIBRARY_CODE = re.compile(
    r"^\s*(class |def |for .* in .*loader|optimizer\.step|\.backward\()", re.M
)


def code_cells(path: Path):
    return [c for c in nbformat.read(path, 4).cells if c.cell_type == "code"]


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_parameters_cell_and_no_library_code(path):
    cells = code_cells(path)
    assert sum("parameters" in c.metadata.get("tags", []) for c in cells) == 1
    for cell in cells:
        assert not LIBRARY_CODE.search(cell.source), cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_hold_no_memory_addresses(path):
    for cell in code_cells(path):
        assert not re.search(r" at 0x[0-9a-f]+>", str(cell.outputs))


def test_main_notebook_badge_and_setup_use_the_repository_url():
    notebook = nbformat.read(MAIN, 4)
    slug = REPOSITORY.removeprefix("https://github.com/")
    assert (
        f"colab.research.google.com/github/{slug}/blob/main/notebooks/{MAIN.name}"
        in notebook.cells[0].source
    )
    assert f'REPOSITORY = "{REPOSITORY}"' in code_cells(MAIN)[0].source


def test_main_notebook_stores_the_assignment_summary_for_nbval():
    """nbval compares a # NBVAL_CHECK_OUTPUT cell with its stored output; without stored
    output there would be nothing to compare, so the stored table must be the assignment's."""
    checked = [c for c in code_cells(MAIN) if c.source.startswith("# NBVAL_CHECK_OUTPUT")]
    assert len(checked) >= 3
    assert stdout_of(checked[0]) == ASSIGNMENT_TABLE
    assert all(stdout_of(c) for c in checked)


def test_nbval_fails_when_the_summary_table_changes(tmp_path):
    """A model edit that changes the table makes the notebook's checked cell fail under nbval:
    simulated by storing a table with one parameter count changed."""
    setup = nbformat.v4.new_code_cell("import eva_utils")  # its warnings are not compared
    cell = nbformat.v4.new_code_cell(
        "# NBVAL_CHECK_OUTPUT\neva_utils.print_summary(eva_utils.resnet18())"
    )
    altered = ASSIGNMENT_TABLE.replace("11,173,962", "11,173,963")
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=altered)]
    notebook = nbformat.v4.new_notebook(cells=[setup, cell])
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "altered.ipynb"
    nbformat.write(notebook, path)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--nbval-lax",
        str(path),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    failing = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert failing.returncode != 0 and "11,173,96" in failing.stdout
    cell.outputs[0]["text"] = ASSIGNMENT_TABLE
    nbformat.write(notebook, path)
    passing = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert passing.returncode == 0, passing.stdout
