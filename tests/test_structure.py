"""The package's shape: no module imports another that imports it back (directly or through
others), whether at the top, inside a function or only for type checkers; and each trick that
must be done one way (the atomic rename) is done in one place."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from eva_utils import engine

PACKAGE = Path(__file__).resolve().parents[1] / "eva_utils"
MAX_LINES = 450  # a module longer than this does more than one job
TRAINING_MODULES = ("engine", "step", "state", "training", "sweeps")


def imported_modules(path: Path) -> set[str]:
    """The eva_utils modules that ``path`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .config import Config
                found.add(node.module.split(".")[0])
            else:  # from . import analysis
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eva_utils."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("eva_utils.")
            )
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return [*path[path.index(child) :], child] if child in path else [node, child]
            if child not in state and (cycle := visit(child, [*path, child])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_modules_type_checking_imports_included():
    graph = import_graph()
    assert "runfolder" in graph["training"]  # the graph is really read
    assert find_cycle(graph) is None


def test_one_module_does_the_atomic_rename():
    renaming = [
        path.name
        for path in PACKAGE.glob("*.py")
        if "os.replace(" in path.read_text() or ".rename(" in path.read_text()
    ]
    assert renaming == ["files.py"]


def test_every_module_is_short():
    lengths = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert lengths["engine.py"] > 50  # the files are really read
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("loop", [engine.train, engine.test])
def test_the_epoch_loops_take_at_most_six_parameters(loop):
    assert len(inspect.signature(loop).parameters) <= 6


@pytest.mark.parametrize("module", ["results", "analysis"])
def test_reading_results_imports_no_training_code(module):
    """Reading two metrics.json files, or analysing a trained model, loads no training engine."""
    code = (
        f"import sys, eva_utils.{module}\n"
        f"print(','.join(m for m in {TRAINING_MODULES!r} if f'eva_utils.{{m}}' in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert loaded == ""


def test_the_package_docstring_names_every_module_in_its_reading_order():
    import eva_utils

    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert {name for name in modules if f"``{name}" not in eva_utils.__doc__} == set()
    teaching = ["model.py", "gbn.py", "recipe.py", "data.py", "engine.py", "training.py"]
    places = [eva_utils.__doc__.index(f"``{name}``") for name in teaching]
    assert places == sorted(places)
