"""What a newcomer sees first: one line saying what will be trained, on what and where, and,
when the run would take hours, how long and how to take a short look instead."""

from __future__ import annotations

import itertools

import pytest
import torch

from eva_utils import Config, training
from eva_utils.precision import choose_precision

from .conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(
    data="synthetic", train_size=64, test_size=32, batch_size=8, epochs=1, device="cpu",
    arch="tiny",
)  # fmt: skip


def test_train_says_device_and_number_format_before_the_first_epoch(tmp_path):
    done = run_cli(
        "train", "--data", "synthetic", "--train-size", "64", "--test-size", "32", "--epochs", "1",
        "--device", "cpu", "--out", str(tmp_path / "run"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))
    said = [line for line in lines[:first_epoch] if "on CPU" in line]
    assert len(said) == 1, lines
    fmt = choose_precision(torch.device("cpu")).name  # bf16 or fp32, as this CPU computes
    assert f"training in {fmt}" in said[0]
    assert "session8 preset, 1 epoch," in said[0] and "64 train and 32 test images" in said[0]
    assert str(tmp_path / "run") in said[0]


def fake_clock(seconds_per_step: float):
    """A clock that advances as if each of the timed training steps took ``seconds_per_step``
    (the estimate reads it before and after them)."""
    ticks = itertools.count()
    return lambda: next(ticks) * seconds_per_step * training.ESTIMATE_AFTER_STEPS


def test_a_run_of_many_hours_says_how_long_and_how_to_take_a_short_look(monkeypatch, capsys):
    monkeypatch.setattr(training, "clock", fake_clock(100.0))  # 100 s per training step
    history = training.fit(Config(**SMALL), progress=True)
    assert len(history) == 1  # said, not refused: the run went on
    estimates = [line for line in capsys.readouterr().err.splitlines() if "estimated" in line]
    # 8 steps left at 100 s: 800 s, under an hour: nothing said; now a longer run
    assert estimates == []
    monkeypatch.setattr(training, "clock", fake_clock(1000.0))
    training.fit(Config(**{**SMALL, "epochs": 2}), progress=True)
    estimates = [line for line in capsys.readouterr().err.splitlines() if "estimated" in line]
    assert len(estimates) == 1
    assert "estimated 4.4 h of training" in estimates[0]  # 1000 s x 8 steps x 2 epochs
    assert "full runs are meant for a GPU" in estimates[0]
    assert "fit(config.replace(epochs=3, train_size=64, test_size=32)" in estimates[0]


def test_no_estimate_or_start_line_without_progress(monkeypatch, capsys):
    monkeypatch.setattr(training, "clock", fake_clock(1000.0))
    training.fit(Config(**{**SMALL, "epochs": 2}), progress=False)
    assert capsys.readouterr().err == ""
