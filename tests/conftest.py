"""Shared fixtures: tiny image folders written per test, the real CIFAR-10 copy if present, and
helpers for the run and resume tests (the CLI in a subprocess, one thread, a fake checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva_utils import runfolder
from eva_utils.config import Config
from eva_utils.data import ImageSet, load_cifar10
from eva_utils.devices import environment
from eva_utils.runfolder import RunFolder
from eva_utils.state import TrainingState

ROOT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
TINY_CLASSES = ("cat", "dog", "ship")


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: pytest runs without xdist too
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (``make test``): one worker more than there are cores. A worker often waits
    on a process it started (a CLI run, a torchrun job, a notebook kernel, a killed process's
    timeout), and the extra worker computes meanwhile. `/usr/bin/time bash .ci/run` on 2 cores
    (its install included): 158% CPU with one worker per core (4edcd2d), 181% with one more
    and the long files first (d443cc2).
    PYTEST_XDIST_AUTO_NUM_WORKERS still sets the number."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return (os.cpu_count() or 1) + 1


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker more than there are cores), each worker
    computes in its share of the cores (one thread where workers outnumber cores), and so do the
    notebook kernels and subprocesses it starts (they inherit OMP_NUM_THREADS): torch's default,
    a thread per core in every worker, oversubscribes them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


# The files that take longest (the sum of their tests' --durations under `make test` on 2 cores,
# longest first): started first, so that the workers (each takes whole files, in this order:
# `make test` passes --no-loadscope-reorder, without which pytest-xdist starts the files with the
# most tests first and a 2-test file of 5 minutes last) end together, not with one of them
# training the last long file alone while the other cores idle.
LONG_FILES = (
    "tests/test_distributed.py", "tests/test_real_data.py", "tests/test_resume.py",
    "tests/test_engine.py", "tests/test_reliability.py", "tests/test_notebooks.py",
    "tests/test_hosts.py", "tests/test_lesson.py",
    "tests/test_cli.py", "tests/test_lock.py", "tests/test_fast_path.py",
    "tests/test_run_integrity.py", "tests/test_first_contact.py", "tests/test_same_history.py",
    "tests/test_full_disk.py", "tests/test_data_identity.py", "tests/test_colab_drive.py",
    "tests/test_figures.py", "tests/test_receptive_field.py",
    "notebooks/session8_resnet18_gbn.ipynb",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    """The long files first (:data:`LONG_FILES`), the others after them in their usual order."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}

    def file_rank(item) -> int:
        path = Path(str(item.path)).resolve()
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        return rank.get(name, len(rank))

    items.sort(key=file_rank)  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Archives that tests extract go to a per-session temporary cache, not ~/.cache/eva8."""
    monkeypatch.setenv("EVA8_CACHE", str(tmp_path_factory.getbasetemp() / "eva8-cache"))


def write_image_folder(
    root: Path, per_class: int = 4, classes=TINY_CLASSES, size: int = 32, seed: int = 0
) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png with a colour per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", max(1, per_class // 2))):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.full((size, size, 3), 40 + 60 * index, dtype=np.int16)
                noise = rng.integers(-20, 20, (size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def write_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "tiny")


@pytest.fixture
def tiny_archive(tmp_path, tiny_folder) -> Path:
    return write_archive(tiny_folder, tmp_path / "tiny.tar.gz")


@pytest.fixture(scope="session")
def real_cifar10() -> tuple[ImageSet, ImageSet]:
    """The shared JPEG copy of CIFAR-10 (skips, saying why, when it is not beside the clone)."""
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 not found at {REAL_ARCHIVE} (only CI and dev machines have it)")
    return load_cifar10(REAL_ARCHIVE, cache_dir=Path.home() / ".cache" / "eva8")


def random_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(
        0, 10, (n,), generator=generator
    )


# --- the CLI in a subprocess, one thread, a fake checkpoint ---------------------------------------


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this one's (read when called, so it includes what a
    test or fixture has set, such as EVA8_CACHE), one OpenMP thread, and this checkout importable.
    """
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m eva_utils *args`` in ``cwd`` to the end; its output is captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "eva_utils", *args], cwd=cwd, env=cli_env(), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def one_thread():
    """One CPU thread in this process, as the CLI subprocesses use: fast on a shared machine.
    Not autouse: a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_checkpoint(config: Config, out: Path, epochs: int = 1) -> Path:
    """A run folder ``out`` whose last.pt holds ``epochs`` epochs of ``config`` (untrained
    weights and made-up numbers: no training needed), saved after each; returns last.pt."""
    run = TrainingState(config, progress=False)
    for epoch in range(1, epochs + 1):
        run.history.append(
            dict(epoch=epoch, train_loss=2.3, train_acc=0.1, test_loss=2.3, test_acc=0.1,
                 lr=config.lr, seconds=1.0)
        )  # fmt: skip
        RunFolder(out).save(run.state_dict(), environment(run.device))
    return out / runfolder.LAST
