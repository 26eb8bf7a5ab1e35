"""A full disk, really: the CLI in a subprocess whose writes stop at a file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored, so a write past it fails as a write to a full disk does).
torch.save reports that as a RuntimeError; the run and the sweep must still end in one line,
keeping the previous epoch's files."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eva_utils import get_preset, runfolder
from eva_utils.results import SWEEP_JSON
from eva_utils.sweeps import plan

from .conftest import cli_env, fake_checkpoint

resource = pytest.importorskip("resource", reason="file-size limits are a POSIX feature")
pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT = 30 * 2**20  # below a ResNet18 checkpoint (45 MB), far above metrics.json and sweep.png
BASE = get_preset("session8").replace(
    data="synthetic", train_size=16, test_size=8, batch_size=8, max_batches=1, device="cpu",
    epochs=2,
)  # fmt: skip
TINY_FLAGS = [
    "--data", "synthetic", "--train-size", "16", "--test-size", "8", "--batch-size", "8",
    "--max-batches", "1", "--device", "cpu", "--quiet",
]  # fmt: skip


def _limit_writes() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored dispositions survive exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def cli_on_a_full_disk(*args: str, cwd: Path) -> tuple[int, list[str]]:
    """``python -m eva_utils *args`` whose files cannot grow past LIMIT; its code and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "eva_utils", *args], cwd=cwd, env=cli_env(), capture_output=True,
        text=True, timeout=300, preexec_fn=_limit_writes,
    )  # fmt: skip
    return done.returncode, done.stderr.strip().splitlines()


def test_a_full_disk_on_save_is_one_line_naming_the_folder_and_the_space_needed(tmp_path):
    last = fake_checkpoint(BASE.replace(epochs=1), tmp_path / "run")
    before = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    code, lines = cli_on_a_full_disk("train", "--resume", "run", "--epochs", "2", "--quiet",
                                     cwd=tmp_path)  # fmt: skip
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("eva8: error: could not save epoch 2 into run (the write stopped")
    assert "MB free there" in lines[0] and "the files of the epochs before are kept" in lines[0]
    assert lines[0].endswith("then python -m eva_utils train --resume run")
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()} == before
    assert runfolder.load_checkpoint(last)["history"][-1]["epoch"] == 1


def test_a_sweep_on_a_full_disk_summarises_what_it_has_and_fails_in_one_line(tmp_path):
    grid = {"dropout": [0.0, 0.1]}
    started, _ = plan(BASE, grid, [1], tmp_path / "sweep")
    fake_checkpoint(started.config.replace(epochs=1), started.folder)  # epoch 1 of 2 saved
    code, lines = cli_on_a_full_disk("sweep", "--out", "sweep", "--grid", "dropout=0,0.1",
                                     "--epochs", "2", *TINY_FLAGS, cwd=tmp_path)  # fmt: skip
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("eva8: error: 2 of 2 runs failed; ")
    assert "could not save epoch" in lines[0] and "the others are summarised" in lines[0]
    assert (tmp_path / "sweep" / SWEEP_JSON).is_file()


def test_a_sweep_whose_runs_all_fail_on_a_full_disk_says_so_not_that_it_holds_no_runs(tmp_path):
    code, lines = cli_on_a_full_disk("sweep", "--out", "sweep", "--grid", "dropout=0,0.1",
                                     "--epochs", "1", *TINY_FLAGS, cwd=tmp_path)  # fmt: skip
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("eva8: error: 2 of 2 runs failed; ")
    assert "could not save epoch 1" in lines[0] and "no epoch is saved" in lines[0]
    assert "no run saved an epoch to summarise" in lines[0]
