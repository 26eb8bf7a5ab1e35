"""The variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and EVA_DIST_TIMEOUT,
when a user sets them by hand or wrongly: one line that says what to do, at once or after the
timeout, never a traceback, a silent exit or a 5-minute wait; and a sweep, which starts its own
processes, is refused under torchrun. In this process: no rank ever meets another."""

from __future__ import annotations

import socket
import time

import pytest

from .test_bad_input import SYNTHETIC, assert_one_line_error, eva8

pytestmark = pytest.mark.usefixtures("one_thread")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_ranks(monkeypatch):
    """None of torchrun's variables, and a short wait for peers should a test reach one."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EVA_DIST_TIMEOUT", "3")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_ranks(monkeypatch, **changes: str) -> None:
    """The variables of rank 0 of 2 as torchrun sets them, with ``changes``."""
    variables = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()), **changes}  # fmt: skip
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_a_sweep_under_torchrun_is_refused_in_one_line_before_any_run(
    tmp_path, monkeypatch, capsys
):
    two_ranks(monkeypatch)
    code, err = eva8(capsys, "sweep", *SYNTHETIC, "--grid", "dropout=0,0.1", "--parallel", "2",
                     "--out", tmp_path / "sweep")  # fmt: skip
    assert_one_line_error(code, err, "a sweep starts its own processes", "torchrun cannot start")
    assert not (tmp_path / "sweep").exists()


def test_a_rank_exported_without_torchrun_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    code, err = eva8(capsys, "train", *SYNTHETIC, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "RANK 1 is outside a WORLD_SIZE of 1", "unset RANK")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"MASTER_ADDR": "", "MASTER_PORT": ""}, "MASTER_ADDR and MASTER_PORT are not set"),
        ({"MASTER_PORT": "abc"}, "MASTER_PORT must be a whole number"),
        ({"MASTER_PORT": "inf"}, "MASTER_PORT must be a whole number"),
        ({"MASTER_PORT": "-5"}, "MASTER_PORT must be a whole number"),
        ({"MASTER_PORT": "0"}, "MASTER_PORT must be a port from 1 to 65535"),
        ({"EVA_DIST_TIMEOUT": "abc"}, "EVA_DIST_TIMEOUT must be a positive number of seconds"),
        ({"EVA_DIST_TIMEOUT": "inf"}, "EVA_DIST_TIMEOUT must be a positive number of seconds"),
        ({"EVA_DIST_TIMEOUT": "-5"}, "EVA_DIST_TIMEOUT must be a positive number of seconds"),
        ({"EVA_DIST_TIMEOUT": "0"}, "EVA_DIST_TIMEOUT must be a positive number of seconds"),
        ({"RANK": "²"}, "RANK must be a whole number"),
    ],
)
def test_a_rank_variable_torchrun_would_not_set_is_one_line_at_once(
    changes, message, tmp_path, monkeypatch, capsys
):
    two_ranks(monkeypatch, **changes)
    started = time.monotonic()
    code, err = eva8(capsys, "train", *SYNTHETIC, "--out", tmp_path / "run")
    assert_one_line_error(code, err, message)
    assert time.monotonic() - started < 2  # refused before waiting for any peer
    assert not (tmp_path / "run").exists()


def test_ranks_that_never_meet_give_up_after_the_timeout_in_one_line(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE=2 left in a shell, no other rank: one line after EVA_DIST_TIMEOUT seconds."""
    two_ranks(monkeypatch)
    monkeypatch.setenv("EVA_DIST_TIMEOUT", "2")
    code, err = eva8(capsys, "train", *SYNTHETIC, "--out", tmp_path / "run")
    line = assert_one_line_error(code, err, "could not meet the other ranks at 127.0.0.1:")
    assert line.startswith("eva8: error: rank 0 of 2") and "within 2 s" in line
    assert "start all 2 with torchrun, or unset RANK, WORLD_SIZE" in line
    assert not (tmp_path / "run").exists()
