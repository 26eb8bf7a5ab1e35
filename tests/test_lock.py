"""One process trains in a run folder at a time: a second one is refused in one line naming the
first, and a lock whose holder died (kill -9, another machine) is taken over with a note; on a
file system without flock, training goes on unlocked with a note. The holders are real
processes."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eva_utils import runfolder
from eva_utils.config import Config
from eva_utils.errors import RunFileError
from eva_utils.runfolder import LOCK, RunFolder
from eva_utils.training import fit

from .conftest import cli_env, fake_checkpoint, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = Config(data="synthetic", train_size=32, test_size=16, batch_size=16, epochs=1,
              device="cpu", num_workers=0, arch="tiny")  # fmt: skip
TRAIN = ("train", "--data", "synthetic", "--train-size", "32", "--test-size", "16",
         "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--quiet",
         "--arch", "tiny")  # fmt: skip
# Opens a run folder (locking it), says so, then holds it until its stdin closes or it is killed.
HOLD = """
import sys
from eva_utils.runfolder import RunFolder
folder = RunFolder.open(sys.argv[1], resume=sys.argv[2] == "resume")
print("locked", flush=True)
sys.stdin.read()
folder.close()
"""


@pytest.fixture
def holder():
    """Start a process that holds a run folder's lock; returns it once it holds the lock."""
    started = []

    def start(folder: Path, resume: bool = False) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder), "resume" if resume else "new"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(),
        )  # fmt: skip
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def one_line(done: subprocess.CompletedProcess, *parts: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    for part in parts:
        assert part in lines[0]


def test_a_second_new_run_in_a_folder_being_trained_is_refused(holder, tmp_path):
    first = holder(tmp_path / "run")
    done = run_cli(*TRAIN, "--out", "run", cwd=tmp_path)
    one_line(done, "run is being trained by", f"process {first.pid}", "choose another --out")
    assert not (tmp_path / "run" / runfolder.LAST).exists()


def test_a_resume_while_the_run_is_trained_is_refused_and_changes_nothing(holder, tmp_path):
    last = fake_checkpoint(TINY, tmp_path / "run")
    before = last.read_bytes()
    first = holder(tmp_path / "run", resume=True)
    done = run_cli("train", "--resume", "run", "--epochs", "2", "--quiet", cwd=tmp_path)
    one_line(done, f"process {first.pid}")
    assert last.read_bytes() == before


def test_fit_refuses_a_folder_another_kernel_trains_in(holder, tmp_path):
    """The notebook's training cell calls fit: two kernels on one run folder."""
    first = holder(tmp_path / "run")
    with pytest.raises(RunFileError, match=f"being trained by process {first.pid}"):
        fit(TINY, out=tmp_path / "run", progress=False)


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(holder, tmp_path):
    first = holder(tmp_path / "run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / "run" / LOCK).exists()  # left behind, as after a power cut
    done = run_cli(*TRAIN, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "took over" in done.stderr and f"process {first.pid}" in done.stderr
    assert (tmp_path / "run" / runfolder.LAST).exists()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_stale_lock_file_of_another_machine_is_taken_over_with_a_note(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    stale = {"pid": 4321, "host": "a-closed-laptop", "since": "2026-11-29 10:00:00"}
    (tmp_path / "run" / LOCK).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="eva_utils"):
        fit(TINY, out=tmp_path / "run", progress=False)
    assert "took over" in caplog.text and "process 4321 on a-closed-laptop" in caplog.text


def test_the_lock_is_released_when_training_ends_or_fails(tmp_path):
    fit(TINY, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / LOCK).exists()
    with pytest.raises(RunFileError, match="already holds a run"):
        RunFolder.open(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK).exists()  # released by the refusal too
    with RunFolder.open(tmp_path / "run", resume=True) as folder:
        assert folder.epochs_done == 1


# A file system without flock (some network and FUSE mounts): what flock raises there.
NO_FLOCK = {"ENOLCK": errno.ENOLCK, "EOPNOTSUPP": errno.EOPNOTSUPP, "EINVAL": errno.EINVAL}


def refuse_flock(monkeypatch, code: int) -> None:
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", NO_FLOCK.values(), ids=NO_FLOCK.keys())
def test_a_file_system_without_flock_trains_unlocked_with_a_one_line_note(
    tmp_path, caplog, monkeypatch, code
):
    refuse_flock(monkeypatch, code)
    with caplog.at_level(logging.WARNING, logger="eva_utils"):
        history = fit(TINY, out=tmp_path / "run", progress=False)
    assert [row["epoch"] for row in history] == [1]
    assert (tmp_path / "run" / runfolder.LAST).exists()
    notes = [r.getMessage() for r in caplog.records if "cannot lock" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0], caplog.text
    assert notes[0].startswith(f"{tmp_path / 'run'}: its file system cannot lock files")
    assert "two sessions must not train this run at once" in notes[0]
    assert not (tmp_path / "run" / LOCK).exists()  # no lock file that locks nothing


def test_a_lock_that_fails_for_another_reason_is_not_ignored(tmp_path, monkeypatch):
    refuse_flock(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        RunFolder.open(tmp_path / "run")


def test_a_lock_that_is_a_symbolic_link_is_replaced_its_target_never_read_or_written(
    tmp_path, caplog
):
    """A .lock linked to a file outside the run folder: the file keeps its bytes and the
    takeover note does not show them."""
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("a user's private notes")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).symlink_to(secret)
    with caplog.at_level(logging.WARNING, logger="eva_utils"), RunFolder.open(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK).is_symlink()
    assert secret.read_text() == "a user's private notes"
    assert "private notes" not in caplog.text
    assert "was a symbolic link: replaced it by a file" in caplog.text


def test_a_taken_over_lock_records_its_holder_without_nul_bytes(tmp_path):
    """The lock file written over a dead holder's is JSON from its first byte, so that the
    next takeover (a second kill -9) names this process."""
    (tmp_path / "run").mkdir()
    stale = {"pid": 4321, "host": "a-closed-laptop", "since": "2026-11-29 10:00:00"}
    (tmp_path / "run" / LOCK).write_text(json.dumps(stale))
    with RunFolder.open(tmp_path / "run"):
        written = (tmp_path / "run" / LOCK).read_bytes()
    assert b"\0" not in written
    assert json.loads(written)["pid"] == os.getpid()


def test_releasing_the_lock_of_a_replaced_run_folder_leaves_the_new_folder_alone(tmp_path):
    folder = RunFolder.open(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text("another trainer's lock")
    folder.close()
    assert (tmp_path / "run" / LOCK).read_text() == "another trainer's lock"
