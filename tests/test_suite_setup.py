"""How `make test` spreads the suite (tests/conftest.py): the number of workers, the order the
files start in, and a suite that still runs where pytest-xdist is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import conftest
from .conftest import ROOT


def test_auto_starts_one_worker_more_than_there_are_cores(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 2)
    assert conftest.pytest_xdist_auto_num_workers(None) == 3
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert conftest.pytest_xdist_auto_num_workers(None) is None  # xdist reads the variable


def test_the_long_files_exist_and_start_first():
    assert all((ROOT / name).is_file() for name in conftest.LONG_FILES)

    class Item:
        def __init__(self, path: Path):
            self.path = path

    items = [Item(ROOT / "tests" / "test_gbn.py"), *(Item(ROOT / n) for n in conftest.LONG_FILES)]
    conftest.pytest_collection_modifyitems(items)
    order = [Path(item.path).relative_to(ROOT).as_posix() for item in items]
    assert order == [*conftest.LONG_FILES, "tests/test_gbn.py"]


def test_the_suite_runs_without_pytest_xdist(tmp_path):
    """Its conftest's xdist hook is optional: without the plugin, pytest does not refuse it."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
         "--collect-only", str(ROOT / "tests" / "test_gbn.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
