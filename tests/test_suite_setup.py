"""How `make test` spreads the suite (tests/conftest.py): the number of workers, the order the
files start in, a suite that still runs where pytest-xdist is not installed, and what it leaves
in the temporary folder."""

from __future__ import annotations

import os
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


def pytest_in_one_process(*args: str, cwd: Path, **options) -> subprocess.CompletedProcess:
    """``pytest -p no:xdist -p no:cacheprovider -q ARGS`` in ``cwd``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, **options,
    )  # fmt: skip


def test_the_suite_runs_without_pytest_xdist(tmp_path):
    """Its conftest's xdist hook is optional: without the plugin, pytest does not refuse it."""
    done = pytest_in_one_process(
        "--collect-only", str(ROOT / "tests" / "test_gbn.py"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:]


PASSES = """
def test_passes(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(bytes(2**20))
"""
FAILS = """
def test_fails(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(bytes(2**20))
    assert False
"""


def session_leftovers(tmp_path: Path, tests: str, exit_code: int) -> list[str]:
    """The tests whose folders (each holding a checkpoint.pt) a pytest session of ``tests``,
    under the project's settings, leaves in its temporary folder; it must exit ``exit_code``."""
    temp = tmp_path / "temp"
    temp.mkdir(parents=True)
    (tmp_path / "test_session.py").write_text(tests)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = pytest_in_one_process(
        "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "test_session.py",
        cwd=tmp_path, env={**env, "TMPDIR": str(temp)},
    )  # fmt: skip
    assert done.returncode == exit_code, done.stdout[-2000:]
    return sorted(p.parent.name for p in temp.rglob("checkpoint.pt"))


def test_a_passed_tests_folder_is_removed_and_a_failed_ones_kept(tmp_path):
    """`make test`'s run folders and checkpoints (GBs) are not left in the temporary folder,
    where pytest would keep the last 3 sessions'; a failed test's files stay to look at."""
    assert session_leftovers(tmp_path / "both", PASSES + FAILS, exit_code=1) == ["test_fails0"]
    assert session_leftovers(tmp_path / "passing", PASSES, exit_code=0) == []
