"""Resume exactness: on the CPU, a run interrupted after epoch k and resumed repeats the
uninterrupted run exactly (every history number but ``seconds``, and the final weights), for
the session8 recipe (GBN, dropout, rotation, StepLR), the fast one (onecycle), the torchvision
loader and a run with a validation split. Also what a resume may and may not change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_utils import get_preset, runfolder
from eva_utils.data import ImageSet, synthetic_cifar10
from eva_utils.errors import CheckpointError, Interrupted
from eva_utils.training import fit

from .conftest import cli_env, fake_checkpoint, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS, STOP_AFTER = 3, 1
TINY = dict(
    data="synthetic", train_size=16, test_size=10, batch_size=8, max_batches=2, device="cpu",
    epochs=EPOCHS, arch="tiny",
)  # fmt: skip
CASES = {
    # step_size 2: the resumed part crosses the StepLR drop at epoch 3
    "session8": get_preset("session8").replace(**TINY),
    "fast-onecycle": get_preset("fast").replace(**TINY),
    "session8-torchvision": get_preset("session8").replace(
        **TINY, loader="torchvision", num_workers=0
    ),
    # a validation split held out of 24 images: the same 16 trained on, 8 validated each epoch
    "session8-val": get_preset("session8").replace(**{**TINY, "train_size": 24}, val_size=8),
    # fp16 with a gradient scaler, whose state (scale, growth tracker) last.pt must carry.
    # Batches of 4: fp16 is emulated on most CPUs, where a step's time grows with the batch
    # (batches of 8 took 128 s); the same steps, and no scaler overflow in them, as with 8.
    "session8-fp16": get_preset("session8").replace(**{**TINY, "batch_size": 4}, precision="fp16"),
}
CLI_TINY = [
    "--data", "synthetic", "--train-size", "16", "--test-size", "10", "--batch-size", "8",
    "--max-batches", "2", "--device", "cpu", "--quiet", "--arch", "tiny",
]  # fmt: skip


def without_seconds(history: list[dict]) -> list[dict]:
    """Everything a history records except wall-clock time, which never repeats."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def stop_after(epoch: int):
    """An on_epoch callback that interrupts the run (as Ctrl-C would) once ``epoch`` is done."""

    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return on_epoch


def interrupted_and_resumed(config, out: Path, **resume_changes) -> list[dict]:
    # in the library's words: how to call fit again (the CLI says --resume)
    with pytest.raises(Interrupted, match=re.escape(f"resume with: fit(config, out='{out}', ")):
        fit(config, out=out, progress=False, on_epoch=stop_after(STOP_AFTER))
    assert len(runfolder.load_checkpoint(out / runfolder.LAST)["history"]) == STOP_AFTER
    return fit(config.replace(**resume_changes), out=out, resume=True, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each case, trained once per module: (history, run folder)."""
    cache = {}

    def get(name: str) -> tuple[list[dict], Path]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name) / "run"
            cache[name] = fit(CASES[name], out=out, progress=False), out
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_resumed_run_repeats_the_uninterrupted_run_exactly(name, uninterrupted, tmp_path):
    full, full_out = uninterrupted(name)
    resumed = interrupted_and_resumed(CASES[name], tmp_path / "run")
    assert [row["epoch"] for row in resumed] == list(range(1, EPOCHS + 1))
    assert without_seconds(resumed) == without_seconds(full)
    # The weights, momentum buffers and schedule end identical too, not just the numbers.
    ours = runfolder.load_checkpoint(tmp_path / "run" / runfolder.LAST)
    theirs = runfolder.load_checkpoint(full_out / runfolder.LAST)
    torch.testing.assert_close(ours["model"], theirs["model"], rtol=0, atol=0)
    torch.testing.assert_close(ours["optimizer"], theirs["optimizer"], rtol=0, atol=0)
    assert ours["scheduler"] == theirs["scheduler"]
    assert ours["scaler"] == theirs["scaler"]


def test_fp16_run_saves_its_gradient_scaler_in_last_pt(uninterrupted):
    _, out = uninterrupted("session8-fp16")
    scaler = runfolder.load_checkpoint(out / runfolder.LAST)["scaler"]
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= (
        scaler.keys()
    )
    assert scaler["_growth_tracker"] > 0  # its successful steps since the last change of scale


def test_resuming_a_finished_run_trains_nothing_and_returns_its_history(uninterrupted):
    full, out = uninterrupted("session8")
    before = (out / runfolder.LAST).stat().st_mtime_ns
    assert fit(CASES["session8"], out=out, resume=True, progress=False) == full
    assert (out / runfolder.LAST).stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # the library names fields (the CLI, flags: --seed 1 -> 2)
        (dict(seed=2), r"\(seed 1 -> 2"),
        (dict(momentum=0.5, weight_decay=0.0), r"\(momentum 0.9 -> 0.5, weight_decay"),
        (dict(arch="resnet34"), r"\(arch tiny -> resnet34"),
        (dict(schedule="onecycle"), r"\(schedule step -> onecycle"),
    ],
)
def test_resume_refuses_settings_the_checkpoint_fixes(change, message, tmp_path):
    """They would be silently ignored (restored from the optimizer) or could not load."""
    last = fake_checkpoint(CASES["session8"], tmp_path / "run")
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=message):
        fit(CASES["session8"].replace(**change), out=tmp_path / "run", resume=True, progress=False)
    assert last.read_bytes() == before


def test_resume_refuses_to_lengthen_a_onecycle_run(tmp_path):
    last = fake_checkpoint(CASES["fast-onecycle"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="onecycle schedule of 6 steps .* need 8"):
        fit(CASES["fast-onecycle"].replace(epochs=4), out=tmp_path / "run", resume=True)
    assert len(runfolder.load_checkpoint(last)["history"]) == 1


def test_resume_refuses_data_with_other_classes(tmp_path):
    fake_checkpoint(CASES["session8"], tmp_path / "run")
    train, test = synthetic_cifar10(16, 10)
    three = tuple(ImageSet(s.images, s.labels % 3, ("cat", "dog", "ship")) for s in (train, test))
    with pytest.raises(CheckpointError, match=r"trained on the classes \['airplane'"):
        fit(CASES["session8"], out=tmp_path / "run", resume=True, datasets=three, progress=False)


def test_cli_resume_with_more_epochs_repeats_the_uninterrupted_run(tmp_path):
    """session8 (StepLR) through the CLI: 2 epochs, then --resume --epochs 3, equals 3 epochs.
    (The onecycle recipe cannot be lengthened: the CLI kill tests resume it after a signal.)"""
    command = [sys.executable, "-m", "eva_utils", "train", *CLI_TINY]
    # The reference runs beside the interrupted one: two processes, one thread each.
    reference = subprocess.Popen(
        [*command, "--epochs", "3", "--out", "full"], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = run_cli("train", *CLI_TINY, "--epochs", "2", "--out", "cut", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_cli("train", "--resume", "cut", "--epochs", "3", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr

    full = runfolder.read_metrics(tmp_path / "full" / runfolder.METRICS)
    cut = runfolder.read_metrics(tmp_path / "cut" / runfolder.METRICS)
    assert [row["epoch"] for row in cut["history"]] == [1, 2, 3]
    assert without_seconds(cut["history"]) == without_seconds(full["history"])
    assert cut["config"] == full["config"]


def test_interrupting_a_run_without_a_folder_says_there_is_nothing_to_resume():
    with pytest.raises(Interrupted, match="stopped in epoch 2; without a run folder"):
        fit(CASES["session8"].replace(epochs=2), progress=False, on_epoch=stop_after(1))
