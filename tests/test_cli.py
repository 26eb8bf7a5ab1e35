"""The eva8 command end to end on tiny data: train writes a run folder, plot redraws it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .conftest import cli_env

CLI = [sys.executable, "-m", "eva_utils"]
FIGURES = {"validation_loss.png", "validation_accuracy.png"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, check=check)


def assert_real_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        # not blank: the original saved its accuracy figure after plt.show(), empty
        assert len(image.convert("L").getcolors(maxcolors=256) or []) > 10


def test_train_on_a_tiny_image_folder_writes_metrics_checkpoints_and_graphs(tmp_path, tiny_folder):
    out = tmp_path / "runs" / "tiny"
    result = run("train", "--preset", "session8", "--data", tiny_folder, "--epochs", "1",
                 "--batch-size", "4", "--arch", "tiny", "--out", out)  # fmt: skip
    assert "best test accuracy" in result.stdout
    # progress: piped into a log (as here), one plain line per epoch instead of redrawn bars
    assert "epoch 1/1: test_acc" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["data"] == str(tiny_folder)
    assert [row["epoch"] for row in metrics["history"]] == [1]
    assert {"torch", "torchvision", "python", "device_name"} <= set(metrics["environment"])
    assert {p.name for p in out.iterdir()} == {"metrics.json", "best.pt", "last.pt"} | FIGURES
    for name in FIGURES:
        assert_real_png(out / name)


def test_train_in_fp16_with_a_gradient_scaler_on_the_cpu(tmp_path):
    """fp16 is emulated on most CPUs (about ten times slower than fp32, a step's time growing
    with its batch), so one step of 4 images, on the small network."""
    out = tmp_path / "run"
    run("train", "--precision", "fp16", "--device", "cpu", "--data", "synthetic",
        "--train-size", "4", "--test-size", "10", "--batch-size", "4", "--epochs", "1",
        "--arch", "tiny", "--out", out, "--quiet")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["precision"] == "fp16"
    assert [row["epoch"] for row in metrics["history"]] == [1]


def test_plot_redraws_the_graphs_without_training(tmp_path):
    out = tmp_path / "run"  # two epochs of one small batch: a metrics.json to draw, quickly
    run("train", "--data", "synthetic", "--train-size", "8", "--test-size", "8",
        "--batch-size", "8", "--epochs", "2", "--arch", "tiny", "--out", out,
        "--quiet")  # fmt: skip
    result = run("plot", out / "metrics.json", "--out", tmp_path / "graphs")
    assert {p.name for p in (tmp_path / "graphs").iterdir()} == FIGURES
    assert "wrote" in result.stdout
    for name in FIGURES:
        assert_real_png(tmp_path / "graphs" / name)


def test_plot_is_deterministic(tmp_path):
    metrics = tmp_path / "metrics.json"
    history = [
        {"epoch": e, "train_loss": 2 / e, "train_acc": e / 10, "test_loss": 2.2 / e,
         "test_acc": e / 11, "lr": 0.016, "seconds": 1.0}
        for e in range(1, 6)
    ]  # fmt: skip
    metrics.write_text(json.dumps({"config": {}, "environment": {}, "history": history}))
    run("plot", metrics, "--out", tmp_path / "a")
    run("plot", metrics, "--out", tmp_path / "b")
    for name in FIGURES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_summary_of_a_preset_shows_its_gbn_and_dropout():
    out = run("summary", "--preset", "session8").stdout
    assert "GhostBatchNorm2d-2" in out and "Dropout" in out and "11,173,962" in out


def test_every_config_field_has_a_train_flag():
    from dataclasses import fields

    from eva_utils.config import Config

    help_text = run("train", "--help").stdout
    for field in fields(Config):
        assert "--" + field.name.replace("_", "-") in help_text


SMOKE = ["--data", "synthetic", "--train-size", "64", "--test-size", "32", "--batch-size", "8",
         "--max-batches", "4", "--epochs", "2", "--device", "cpu", "--arch", "tiny"]  # fmt: skip


def test_progress_piped_into_a_log_is_one_plain_line_per_epoch(tmp_path):
    env = {**cli_env(), "NO_COLOR": "1"}
    result = subprocess.run(
        [*CLI, "train", *SMOKE, "--out", "run"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr
    start, *lines = result.stderr.splitlines()
    assert "run folder: run" in start  # the one line before training (issue 28), then:
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], result.stderr
    assert "test_acc" in lines[1]


def test_a_run_that_succeeded_exits_0_where_the_output_cannot_show_its_path(tmp_path):
    env = {**cli_env(), "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [*CLI, "train", *SMOKE, "--quiet", "--out", "runs/ünï"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "ünï" / "best.pt").is_file()
    assert "wrote runs/\\xfcn\\xef/metrics.json" in result.stdout
