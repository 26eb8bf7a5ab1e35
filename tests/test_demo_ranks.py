"""The main notebook's two-process demo (``lesson.ranks_and_ghost_batches``) when a run fails: one
line naming the run and why, never a traceback of the subprocess call. (The demo itself runs in
the main notebook under nbval and as in Colab: tests/test_notebooks.py.)"""

from __future__ import annotations

import pytest

from eva_utils import lesson
from eva_utils.errors import EvaError

TORCHRUN_TAIL = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "demo_ranks.py", line 40, in train
[rank1]: torch.distributed.DistBackendError: wait timeout after 60000ms, keys: /default_pg/0//cpu//0
E1202 16:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
eva_utils.demo_ranks FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
============================================================
"""


def fail_with(stderr: str, code: int = 1) -> list[str]:
    """python arguments of a process that writes ``stderr`` and exits with ``code``."""
    return ["-c", f"import sys; sys.stderr.write({stderr!r}); sys.exit({code})"]


def test_a_failed_run_is_named_with_its_exit_code_and_the_ranks_error(monkeypatch):
    runs = [("1 process with BatchNorm", fail_with(TORCHRUN_TAIL))]
    monkeypatch.setattr(lesson, "DEMO_RUNS", runs)
    with pytest.raises(EvaError) as error:
        lesson.ranks_and_ghost_batches()
    assert str(error.value) == (
        "the two-process demo failed: 1 process with BatchNorm exited with code 1 "
        "([rank1]: torch.distributed.DistBackendError: wait timeout after 60000ms, keys: "
        "/default_pg/0//cpu//0)"
    )


def test_a_run_that_says_nothing_useful_is_named_by_its_last_line(monkeypatch):
    runs = [("2 processes", fail_with("starting\nthe peer went away\n=====\n", code=3))]
    monkeypatch.setattr(lesson, "DEMO_RUNS", runs)
    with pytest.raises(EvaError, match=r"2 processes exited with code 3 \(the peer went away\)$"):
        lesson.ranks_and_ghost_batches()


def test_a_run_past_its_time_is_one_line_not_a_traceback(monkeypatch):
    sleeper = ("2 processes", ["-c", "import time; time.sleep(30)"])
    monkeypatch.setattr(lesson, "DEMO_RUNS", [sleeper])
    monkeypatch.setattr(lesson, "DEMO_TIMEOUT", 1)
    with pytest.raises(EvaError) as error:
        lesson.ranks_and_ghost_batches()
    assert str(error.value) == "the two-process demo failed: 2 processes did not finish in 1 s"
    assert error.value.__suppress_context__


def test_the_demo_gives_a_slow_peer_minutes_not_the_default_seconds(monkeypatch):
    """Each run's environment: one thread, and a peer timeout that a loaded machine's start-up
    (16 s seen for importing torch and eva_utils at load 7 on 2 cores) stays far inside."""
    seen = {}

    def record(command, env, **options):
        seen.update(env)
        raise SystemExit  # stop after the first run

    monkeypatch.setattr(lesson.subprocess, "run", record)
    with pytest.raises(SystemExit):
        lesson.ranks_and_ghost_batches()
    assert seen["OMP_NUM_THREADS"] == "1" and float(seen["EVA_DIST_TIMEOUT"]) >= 120
