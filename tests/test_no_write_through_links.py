"""No file of a run, a plot or a sweep is written through a symbolic link at its name: a link
there (to a user's file outside the folder) is replaced by the file, and what it pointed to
keeps its bytes. The lock file's own case is in test_lock.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eva_utils import sweeps
from eva_utils.cli import main
from eva_utils.config import Config
from eva_utils.plots import FIGURE_NAMES

from .test_bad_input import good_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def linked_to_a_users_file(link: Path, target: Path) -> None:
    target.write_text("a user's own file")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_plot_replaces_a_link_at_a_figure_name_and_leaves_its_target(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps(good_metrics()))
    figure = tmp_path / "out" / FIGURE_NAMES["loss"]
    linked_to_a_users_file(figure, tmp_path / "users-file.txt")
    assert main(["plot", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "users-file.txt").read_bytes() == b"a user's own file"
    assert not figure.is_symlink()
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_a_sweep_log_that_is_a_link_is_replaced_and_its_target_left_alone(tmp_path, monkeypatch):
    """The child's output goes into a file of the sweep's logs/, not into the link's target."""

    popen = subprocess.Popen

    def child(command, **options):  # writes its output as a trained run would
        options["stdout"].write("the child's output\n")
        options["stdout"].flush()
        return popen([sys.executable, "-c", ""])

    monkeypatch.setattr(sweeps.subprocess, "Popen", child)
    run = sweeps.PlannedRun(Config(data="synthetic"), tmp_path / "sweep" / "run-a", 0)
    log = tmp_path / "sweep" / sweeps.LOGS / "run-a.log"
    linked_to_a_users_file(log, tmp_path / "users-file.txt")
    sweeps._start(run).wait()
    assert (tmp_path / "users-file.txt").read_bytes() == b"a user's own file"
    assert not log.is_symlink()
    assert log.read_text() == "the child's output\n"
