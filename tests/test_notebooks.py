"""The notebooks: thin clients of the library, with checked outputs that nbval compares."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

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


# Paths of one machine: a student's clone has none of them.
MACHINE_PATHS = re.compile(r"/work/|/home/|/Users/|/tmp/|\.venv|site-packages|[A-Z]:\\\\")
# What a smoke run prints (notebook.SMOKE_ENV's notice, the synthetic data, its temporary folder).
SMOKE_OUTPUT = re.compile(r"EVA_SMOKE|smoke run|synthetic|eva8-smoke-")


def stored_text(cell) -> str:
    parts = []
    for output in cell.outputs:
        parts.append("".join(output.get("text", "")))
        for value in output.get("data", {}).values():
            parts.append(value if isinstance(value, str) else "".join(value))
        parts.extend(output.get("traceback", []))
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_hold_no_machine_paths(path):
    for cell in code_cells(path):
        assert not MACHINE_PATHS.search(stored_text(cell)), stored_text(cell)[:500]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_not_smoke_outputs(path):
    cells = code_cells(path)
    assert any(cell.outputs for cell in cells), "the notebook stores a real run's outputs"
    for cell in cells:
        assert not SMOKE_OUTPUT.search(stored_text(cell)), stored_text(cell)[:500]


def test_main_notebook_draws_the_reference_run_before_training_and_compares_after():
    sources = [c.source for c in code_cells(MAIN)]
    reference = next(i for i, s in enumerate(sources) if "notebook.reference_run()" in s)
    training = next(i for i, s in enumerate(sources) if "lesson.train(" in s)
    assert reference < training
    assert "eva_utils.compare(reference)" in sources[reference]
    after = "\n".join(sources[training:])
    assert "eva_utils.compare(reference, run_dir)" in after
    assert "notebook.compare_with_reference(" in after
    text = "\n".join(c.source for c in nbformat.read(MAIN, 4).cells)
    assert "90% at epoch 22" not in text and "the original\n  reached 90%" not in text


def run_notebook(path: Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
         "--output-dir", str(cwd), "--output", "executed.ipynb", str(path)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_receptive_field_notebook_runs_on_a_fresh_clone_without_a_trained_model(tmp_path):
    """No ../shared, no run folder, no release to download: an untrained model, said so, top
    to bottom."""
    notebook = nbformat.read(ROOT / "notebooks" / "receptive_fields.ipynb", 4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source += '\nDATA = "synthetic"  # injected by the test: no CIFAR-10 offline'
    copy = tmp_path / "notebooks" / "receptive_fields.ipynb"
    copy.parent.mkdir()
    nbformat.write(notebook, copy)
    env = {key: value for key, value in os.environ.items() if not key.startswith("EVA_")} | {
        "EVA_REFERENCE_RUN": str(tmp_path / "no-such-run"),
        "EVA_PRETRAINED_URL": (tmp_path / "no-such-asset.pt").as_uri(),  # offline: never GitHub
        "TORCH_HOME": str(tmp_path / "torch"),
        "PYTHONPATH": str(ROOT),
    }
    done = run_notebook(copy, copy.parent, env)
    assert done.returncode == 0, done.stderr[-3000:]
    executed = nbformat.read(copy.parent / "executed.ipynb", 4)
    text = "\n".join(stored_text(c) for c in executed.cells if c.cell_type == "code")
    assert "could not download the trained model from file://" in text
    assert "model: an UNTRAINED session8 ResNet18" in text
    assert "test images: " in text


def test_strip_progress_bars_keeps_everything_but_the_bars(tmp_path):
    strip_progress_bars = _maintainer_tool("strip_progress_bars").strip_progress_bars

    cell = nbformat.v4.new_code_cell("eva_utils.fit(...)")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="\repochs:  33%|███ | 1/3"),
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[A"),
        nbformat.v4.new_output("stream", name="stderr", text="\n"),
        nbformat.v4.new_output("stream", name="stderr", text="UserWarning: something real\n"),
        nbformat.v4.new_output("stream", name="stdout", text=" epoch  train loss\n"),
    ]
    path = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    assert strip_progress_bars(path) == 3
    kept = nbformat.read(path, 4).cells[0].outputs
    assert [o["text"] for o in kept] == ["UserWarning: something real\n", " epoch  train loss\n"]


def _maintainer_tool(name: str):
    """A script of notebooks/ (not library API), imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "notebooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# google.colab.drive's stand-in: the Drive is a folder that outlives the runtime (tmp_path/content)
FAKE_DRIVE = '''"""A stand-in for google.colab.drive: mount(mountpoint) links mountpoint to the
folder $FAKE_GOOGLE_DRIVE, which holds MyDrive, as Colab's mount shows the student's Drive."""
import os


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    drive = os.environ["FAKE_GOOGLE_DRIVE"]
    os.makedirs(os.path.join(drive, "MyDrive"), exist_ok=True)
    if os.path.islink(mountpoint) and not force_remount:
        print(f"Drive already mounted at {mountpoint}")
        return
    os.symlink(drive, mountpoint)  # as Colab's, the mount point's folder must exist
    print(f"Mounted at {mountpoint}")
'''


def colab_environment(tmp_path: Path, repository: str) -> dict[str, str]:
    """A kernel environment as Colab's, offline: ``google.colab`` imported at start-up (a stub,
    through sitecustomize), the setup cell's clone in ``tmp_path`` and pip installing into a
    throwaway folder (no dependencies: Colab has them), never into this environment. The
    runtime's disk is ``tmp_path / "content"``; Google Drive mounts there, as ``drive``, from
    ``tmp_path / "google-drive"``, which outlives it."""
    stub = tmp_path / "colab-stub"
    (stub / "google" / "colab").mkdir(parents=True)  # a namespace package, as google's is
    (stub / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab."""\n')
    (stub / "google" / "colab" / "drive.py").write_text(FAKE_DRIVE)
    (stub / "sitecustomize.py").write_text("import google.colab  # noqa: F401\n")
    return hosted_environment(tmp_path, repository, tmp_path / "content" / "eva8") | {
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(stub)]),
        "EVA_DRIVE_MOUNT": str(tmp_path / "content" / "drive"),
        "FAKE_GOOGLE_DRIVE": str(tmp_path / "google-drive"),
    }


def kaggle_environment(tmp_path: Path, repository: str) -> dict[str, str]:
    """A kernel environment as Kaggle's, offline: ``KAGGLE_KERNEL_RUN_TYPE`` set, as in every
    Kaggle kernel; ``tmp_path / "kaggle"`` stands for ``/kaggle``, its ``working`` folder holding
    the clone and its ``input`` folder the notebook's added data sets."""
    return hosted_environment(tmp_path, repository, tmp_path / "kaggle" / "working" / "eva8") | {
        "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
        "EVA8_KAGGLE_INPUT": str(tmp_path / "kaggle" / "input"),
    }


def hosted_environment(tmp_path: Path, repository: str, clone: Path) -> dict[str, str]:
    """What Colab's and Kaggle's stand-ins share: the setup cell clones ``repository`` into
    ``clone``, and pip installs it into ``tmp_path / "site"`` (no dependencies: the hosts have
    them), never into this environment; smoke mode, and no download of the trained model."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("EVA_", "PIP_", "PYTHON"))}
    keep = {k: v for k, v in keep.items() if not k.startswith("KAGGLE_")}
    return keep | {
        "PYTHONPATH": str(tmp_path / "site"),
        "PIP_TARGET": str(tmp_path / "site"),
        "PIP_NO_DEPS": "1",
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of --no-build-isolation
        "EVA8_REPOSITORY": repository,
        "EVA8_CLONE": str(clone),
        "EVA_SMOKE": "1",
        "EVA_PRETRAINED_URL": (tmp_path / "no-such-asset.pt").as_uri(),
        "TORCH_HOME": str(tmp_path / "torch"),
    }


def test_main_notebook_runs_as_in_colab_from_a_fresh_clone(tmp_path):
    """The setup cell clones the repository (here: this checkout's committed HEAD, by its
    file:// address), installs it non-editable, and every cell then runs in smoke mode from the
    clone, the reference run found there; the developer's environment is left untouched."""
    site_packages = Path(nbformat.__file__).parents[1]
    before = sorted(os.listdir(site_packages))
    notebook = nbformat.read(MAIN, 4)
    notebook.cells.append(nbformat.v4.new_code_cell("print('imported from', eva_utils.__file__)"))
    work = tmp_path / "content"
    work.mkdir()
    nbformat.write(notebook, work / MAIN.name)
    done = run_notebook(work / MAIN.name, work, colab_environment(tmp_path, ROOT.as_uri()))
    assert done.returncode == 0, done.stderr[-3000:]
    executed = nbformat.read(work / "executed.ipynb", 4)
    text = "\n".join(stored_text(c) for c in executed.cells if c.cell_type == "code")
    assert f"imported from {tmp_path / 'site' / 'eva_utils' / '__init__.py'}" in text
    assert "session8-h100" in text  # the reference run, from the clone's results/
    assert (tmp_path / "content" / "eva8" / "results" / "session8-h100").is_dir()
    assert sorted(os.listdir(site_packages)) == before


def test_main_notebook_setup_cell_says_what_to_do_when_the_clone_fails(tmp_path):
    (tmp_path / "content").mkdir()
    setup = nbformat.v4.new_notebook(cells=[code_cells(MAIN)[0]])
    setup.metadata = nbformat.read(MAIN, 4).metadata
    nbformat.write(setup, tmp_path / "content" / "setup.ipynb")
    nowhere = (tmp_path / "no-such-repository").as_uri()
    done = run_notebook(
        tmp_path / "content" / "setup.ipynb", tmp_path / "content",
        colab_environment(tmp_path, nowhere),
    )  # fmt: skip
    assert done.returncode != 0
    assert (
        f"could not clone {nowhere}: check the address (a fork sets REPOSITORY above, a mirror "
        "EVA8_REPOSITORY) and that this runtime has a network"
    ) in done.stderr


# --- the parameter cell's values: Python values of the field's type (issue 25 item 10) ---------

WRONG_TYPES = [
    ("epochs", "3", "epochs='3': give a whole number"),
    ("epochs", 3.5, "epochs=3.5: give a whole number"),
    ("lr", "0.1", "lr='0.1': give a number"),
    ("dropout", None, "dropout=None: give a number"),
    ("train_size", 64.0, "train_size=64.0: give a whole number or None"),
    ("nesterov", "False", "nesterov='False': give True or False"),
]


@pytest.mark.parametrize("name, value, says", WRONG_TYPES)
def test_a_parameter_of_the_wrong_type_is_one_config_error(name, value, says):
    from eva_utils import notebook
    from eva_utils.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        notebook.notebook_config(**{name: value})
    assert str(error.value).startswith(says) and "\n" not in str(error.value)


def test_both_notebooks_set_up_with_the_same_clone_and_install():
    """The setup cell runs before eva_utils can be imported, so it cannot call the library: the
    two notebooks carry one copy each, and they must not drift apart."""
    setups = [code_cells(path)[0].source for path in NOTEBOOKS]
    shared = [setup[: setup.index("import eva_utils\n")] for setup in setups]
    assert len(NOTEBOOKS) == 2 and shared[0] == shared[1]
    assert "KAGGLE_KERNEL_RUN_TYPE" in shared[0] and '"google.colab" in sys.modules' in shared[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_has_a_colab_and_a_kaggle_badge(path):
    slug = REPOSITORY.removeprefix("https://github.com/")
    title = nbformat.read(path, 4).cells[0].source
    address = f"github/{slug}/blob/main/notebooks/{path.name}"
    assert f"colab.research.google.com/{address}" in title
    assert (
        f"kaggle.com/kernels/welcome?src=https://github.com/{slug}/blob/main/notebooks/{path.name}"
        in title
    )
