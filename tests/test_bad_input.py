"""Bad input gives one clear line on stderr (``eva8: error: ...``, no traceback), a non-zero exit
and loses nothing; ``--debug`` shows the traceback.

Two cases run the real ``python -m eva_utils`` process; the others call ``cli.main`` in this
process (the same code, a few seconds faster each: importing torch dominates a subprocess).
An exception escaping ``main`` would be a traceback for the user, and fails the test.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from eva_utils import get_preset, runfolder
from eva_utils.cli import main
from eva_utils.config import Config
from eva_utils.errors import (
    ConfigError,
    DataError,
    command_line_words,
    resume_command,
    train_command,
)

from .conftest import fake_checkpoint, run_cli, write_archive, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "--train-size", "16", "--test-size", "10", "--batch-size", "8", "--max-batches", "1",
    "--epochs", "1", "--device", "cpu", "--quiet", "--arch", "tiny",
]  # fmt: skip
SYNTHETIC = ["--data", "synthetic", *TINY]


def eva8(capsys, *args: str | Path) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, stderr)."""
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("eva8: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- the real process -------------------------------------------------------------------------


def test_missing_data_path_is_one_line_in_the_real_process(tmp_path):
    result = run_cli("train", "--data", "nowhere", *TINY, "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "eva8: error: data path nowhere does not exist: pass --data PATH (an ImageFolder with "
        "train/ and test/, or a .tar.gz of one)"
    )
    assert not (tmp_path / "run").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", "--data", "nowhere", *TINY, "--out", "run", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "eva_utils.errors.DataError: data path nowhere does not exist" in result.stderr


def test_debug_flag_reraises_in_process(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        main(["--debug", "train", "--data", str(tmp_path / "nowhere"), *TINY, "--out", "run"])


# --- data --------------------------------------------------------------------------------------


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = eva8(capsys, "train", "--data", tmp_path / "empty", *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "is empty")
    assert not (tmp_path / "r").exists()


def test_folder_without_train_and_test(tmp_path, capsys):
    write_image_folder(tmp_path / "data")
    (tmp_path / "data" / "test").rename(tmp_path / "data" / "validation")
    code, err = eva8(capsys, "train", "--data", tmp_path / "data", *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "has no train/ and test/ folders")


def test_train_and_test_classes_differ(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    (data / "test" / "ship").rename(data / "test" / "truck")
    code, err = eva8(capsys, "train", "--data", data, *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "train and test classes differ", "'ship'", "'truck'")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(damage, tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    bad = data / "train" / "dog" / "0002.png"
    content = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "garbage" else content[: len(content) // 2])
    code, err = eva8(capsys, "train", "--data", data, *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, f"cannot read image {bad}", "delete or replace it")


def test_file_that_is_not_a_tar_gz(tmp_path, capsys):
    fake = tmp_path / "cifar10.tar.gz"
    fake.write_text("<html>404 Not Found</html>")
    code, err = eva8(capsys, "train", "--data", fake, *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "is not a .tar or .tar.gz archive")


def test_truncated_tar_gz(tmp_path, capsys):
    archive = write_archive(write_image_folder(tmp_path / "data"), tmp_path / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    code, err = eva8(capsys, "train", "--data", archive, *TINY, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "could not extract", "is it a complete download?")


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "epochs must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--batch-size", "-8"], "batch_size must be a positive integer, got -8"),
        (["--lr", "0"], "lr must be a positive number, got 0.0"),
        (["--lr", "-0.1"], "lr must be a positive number, got -0.1"),
        (["--lr", "nan"], "lr must be a positive number, got nan"),
        (["--lr", "inf"], "lr must be a positive number, got inf"),
        (["--momentum", "-0.9"], "momentum must be zero or positive"),
        (["--momentum", "0", "--nesterov"], "nesterov needs a positive momentum"),
        (["--weight-decay", "-1"], "weight_decay must be zero or positive"),
        (["--gamma", "0"], "gamma must be a positive number"),
        (["--preset", "fast", "--warmup", "1.5"], "warmup must be a fraction in (0, 1)"),
        (["--num-workers", "-1"], "num_workers must be zero or positive"),
        (["--batch-size", "2", "--num-splits", "4"], "num_splits (4) is larger than batch_size"),
        (["--preset", "session9"], "unknown preset 'session9': choose one of session8, fast"),
        (["--arch", "resnet50"], "arch must be one of resnet18, resnet34, tiny"),
        (
            ["--seed", str(2**64)],
            f"seed must be a whole number from -2**63 to 2**63 - 1, got {2**64}",
        ),
        (["--seed", str(2**63)], "seed must be a whole number from -2**63 to 2**63 - 1"),
    ],
)
def test_impossible_settings(flags, message, tmp_path, capsys):
    code, err = eva8(capsys, "train", *SYNTHETIC, *flags, "--out", tmp_path / "r")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


def test_num_splits_larger_than_a_tiny_training_set(tmp_path, capsys):
    code, err = eva8(
        capsys, "train", *SYNTHETIC, "--train-size", "1", "--num-splits", "2", "--out",
        tmp_path / "r",
    )  # fmt: skip
    assert_one_line_error(code, err, "num_splits (2) is larger than the batch (1 images)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_where_there_is_none(device, tmp_path, capsys):
    code, err = eva8(capsys, "train", *SYNTHETIC, "--device", device, "--out", tmp_path / "r")
    assert_one_line_error(code, err, f"device '{device}' was asked for but CUDA is not available")
    assert not (tmp_path / "r").exists()


def test_library_settings_given_as_text_or_paths_mean_what_they_say():
    """A notebook's ``augment="crop"`` is the augmentation crop, not the letters c, r, o, p;
    ``data=Path(...)`` is that path; ``data=123`` is refused naming what data may be."""
    assert Config(augment="crop").augment == ("crop",)
    assert Config(augment="flip,crop").augment == ("crop", "flip")
    assert Config(data=Path("tiny.tar.gz")).data == "tiny.tar.gz"
    with pytest.raises(ConfigError) as error:
        Config(data=123)
    assert str(error.value) == (
        "data must be the path of a folder or .tar.gz (text), 'synthetic' or none, got 123"
    )


# --- plot ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"history": [{"epoch": 1, "test_acc": ', "is not valid JSON"),
        ("\x89PNG\r\n\x1a\n\x00\x00", "is not valid JSON"),
        ('{"loss": [2.3, 1.9], "val_loss": [2.2, 2.0]}', "is not an eva8 metrics.json"),
        ('[{"epoch": 1}]', "is not an eva8 metrics.json"),
        ('{"history": [{"epoch": 1, "loss": 2.3}]}', "is not an eva8 metrics.json"),
        ('{"history": []}', "is not an eva8 metrics.json"),
        ("[" * 100_000 + "]" * 100_000, "nests its values too deeply to be read"),
    ],
    ids=["truncated", "binary", "keras-history", "list", "other-keys", "no-epochs", "nested"],
)
def test_plot_of_a_file_that_is_not_eva8_metrics(content, message, tmp_path, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    code, err = eva8(capsys, "plot", path, "--out", tmp_path / "images")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("make", ["missing", "folder"])
def test_plot_of_a_path_that_is_no_file(make, tmp_path, capsys):
    path = tmp_path / "metrics.json"
    if make == "folder":
        path.mkdir()
    code, err = eva8(capsys, "plot", path, "--out", tmp_path / "images")
    assert_one_line_error(code, err, str(path))


# --- run folders and resume -----------------------------------------------------------------------


def fake_run(out: Path, preset: str = "session8", **changes) -> Path:
    """A run folder whose last.pt holds epoch 1 (untrained weights: no training needed)."""
    config = get_preset(preset).replace(
        data="synthetic", train_size=16, test_size=10, batch_size=8, max_batches=1,
        device="cpu", epochs=1, **changes,
    )  # fmt: skip
    return fake_checkpoint(config, out)


def test_train_into_a_folder_that_holds_a_run_refuses_and_says_resume(tmp_path, capsys):
    last = fake_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    code, err = eva8(capsys, "train", *SYNTHETIC, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "already holds a run", f"--resume {tmp_path / 'run'}")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert len(runfolder.load_checkpoint(last)["history"]) == 1


def test_printed_commands_quote_a_folder_name_for_the_shell(tmp_path, capsys):
    """A folder named ``x;touch PWNED``: the command a message prints, pasted into a shell,
    passes the folder as one argument instead of running ``touch``."""
    run = tmp_path / "x;touch PWNED"
    fake_run(run)
    code, err = eva8(capsys, "train", *SYNTHETIC, "--out", run)
    line = assert_one_line_error(code, err, "already holds a run")
    assert f"continue it with --resume {shlex.quote(str(run))}, or" in line
    with command_line_words():
        for command in (resume_command(run), train_command(run)):
            assert shlex.split(command)[-1] == str(run), command


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_of_a_folder_without_checkpoint(make, tmp_path, capsys):
    if make == "empty":
        (tmp_path / "run").mkdir()
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--quiet")
    assert_one_line_error(code, err, "has no checkpoint (last.pt) to resume")


def test_resume_of_a_truncated_checkpoint(tmp_path, capsys):
    last = fake_run(tmp_path / "run")
    last.write_bytes(last.read_bytes()[:1000])
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--quiet")
    assert_one_line_error(code, err, "is not a readable checkpoint")


def test_resume_of_a_resnet34_run_as_resnet18(tmp_path, capsys):
    last = fake_run(tmp_path / "run34", arch="resnet34")
    before = last.read_bytes()
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run34", "--arch", "resnet18")
    assert_one_line_error(code, err, "--arch resnet34 -> resnet18", "start a new run with --out")
    assert last.read_bytes() == before


def test_resume_of_a_checkpoint_whose_weights_are_another_architecture(tmp_path, capsys):
    """Crafted: the config says resnet18 but the weights are a resnet34's."""
    last = fake_run(tmp_path / "run", arch="resnet34")
    state = runfolder.load_checkpoint(last)
    state["config"]["arch"] = "resnet18"
    torch.save(state, last)
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--quiet")
    assert_one_line_error(
        code, err, "holds weights of another architecture than this model", "unexpected"
    )


def test_resume_cannot_lengthen_a_onecycle_run(tmp_path, capsys):
    fake_run(tmp_path / "run", preset="fast")
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--quiet")
    assert_one_line_error(code, err, "onecycle schedule of 1 steps", "cannot be lengthened")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "fast"], "--preset cannot change a resumed run"),
        (["--out", "elsewhere"], "give --out (a new run) or --resume (an existing one), not both"),
        (["--seed", "7"], "--seed 1 -> 7"),
    ],
)
def test_resume_with_flags_it_cannot_honour(flags, message, tmp_path, capsys):
    fake_run(tmp_path / "run")
    code, err = eva8(capsys, "train", "--resume", tmp_path / "run", *flags, "--quiet")
    assert_one_line_error(code, err, message)


# --- divergence ----------------------------------------------------------------------------------


def assert_last_good_epoch_kept(run: Path, lr: float) -> None:
    state = runfolder.load_checkpoint(run / runfolder.LAST)
    assert [row["epoch"] for row in state["history"]] == [1]
    assert state["config"]["lr"] == lr
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    history = runfolder.read_metrics(run / runfolder.METRICS)["history"]
    assert all(math.isfinite(row["test_loss"]) for row in history)


# A step schedule that multiplies the learning rate by 1e8 after epoch 1: a good first epoch,
# then a step so large that training diverges, in one run.
EXPLODING_LR = ["--step-size", "1", "--gamma", "1e8", "--epochs", "2"]


def test_nan_training_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    run = tmp_path / "run"
    four_steps = ["--data", "synthetic", *TINY, "--train-size", "32", "--max-batches", "none"]
    code, err = eva8(capsys, "train", *four_steps, *EXPLODING_LR, "--out", run)
    line = assert_one_line_error(
        code, err, "the loss became NaN or infinite in epoch 2 train, step ",
        "lower the learning rate (--lr)", "in a new run (a run keeps its recipe)",
        f"{run / 'last.pt'} keeps epochs 1-1, the last good ones",
    )  # fmt: skip
    assert "step 1:" not in line  # step 1's loss is computed before the first huge update
    assert_last_good_epoch_kept(run, lr=0.016)


def test_weights_that_diverge_in_the_last_step_are_not_saved(tmp_path, capsys):
    """One step per epoch: the loss of the huge step is still finite (computed before it), but
    the weights it leaves give a NaN test loss. That epoch must not overwrite last.pt."""
    run = tmp_path / "run"
    code, err = eva8(capsys, "train", *SYNTHETIC, *EXPLODING_LR, "--out", run)
    assert_one_line_error(
        code, err, "the test loss became NaN or infinite after epoch 2",
        f"{run / 'last.pt'} keeps epochs 1-1",
    )  # fmt: skip
    assert_last_good_epoch_kept(run, lr=0.016)


# --- files of a run that were edited or damaged (issue "Reliability, round three") -------------


def good_metrics() -> dict:
    """A metrics.json as training writes it: two epochs."""
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "test_loss": 1.9 / e,
         "test_acc": 0.35 * e, "lr": 0.016, "seconds": 1.0}
        for e in (1, 2)
    ]  # fmt: skip
    config = get_preset("session8").replace(data="synthetic").to_dict()
    return {"config": config, "environment": {"device_name": "cpu"}, "history": history}


def _set(field: str, value):
    def change(metrics: dict) -> None:
        metrics[field] = value

    return change


def _set_epoch(index: int, key: str, value):
    def change(metrics: dict) -> None:
        metrics["history"][index][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("config", "session8"), "config is 'session8', not an object"),
        (_set_epoch(1, "test_acc", math.nan), "test_acc of epoch 2 is nan, not a finite number"),
        (_set_epoch(0, "train_loss", math.inf), "train_loss of epoch 1 is inf, not a finite"),
        (_set_epoch(1, "test_acc", 87.5), "test_acc of epoch 2 is 87.5, not a fraction in [0, 1]"),
        (_set_epoch(1, "epoch", 1), "epoch 1 is row 2 of the history"),
        (_set_epoch(1, "epoch", 3), "epoch 3 is row 2 of the history"),
        (_set_epoch(0, "epoch", 2), "epoch 2 is row 1 of the history"),
        (_set_epoch(1, "epoch", 1.5), "epoch 1.5 is row 2 of the history"),
    ],
    ids=["config-text", "nan", "inf", "percent", "duplicated", "missing", "reversed",
         "fractional"],
)  # fmt: skip
def test_plot_refuses_metrics_with_impossible_values_naming_field_and_epoch(
    change, message, tmp_path, capsys
):
    metrics = good_metrics()
    change(metrics)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    code, err = eva8(capsys, "plot", path, "--out", tmp_path / "images")
    assert_one_line_error(code, err, message, str(path))
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("command", ["compare", "figures"])
def test_compare_and_figures_refuse_a_config_that_is_text(command, tmp_path, capsys):
    metrics = good_metrics()
    metrics["config"] = "session8"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    code, err = eva8(capsys, command, tmp_path / "run", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "config is 'session8', not an object")


def test_compare_refuses_metrics_without_environment(tmp_path, capsys):
    metrics = good_metrics()
    del metrics["environment"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    code, err = eva8(capsys, "compare", tmp_path / "run", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "environment is None, not an object")


def test_compare_refuses_a_provenance_whose_hardware_is_not_text(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(good_metrics()))
    (tmp_path / "run" / "provenance.json").write_text('{"hardware": {"gpu": "H100"}}')
    code, err = eva8(capsys, "compare", tmp_path / "run", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "hardware is {'gpu': 'H100'}, not text")


@pytest.mark.parametrize("key", ["epoch", "classes"])
def test_analyze_refuses_a_best_checkpoint_without_epoch_or_classes(key, tmp_path, capsys):
    fake_run(tmp_path / "run")
    best = tmp_path / "run" / runfolder.BEST
    state = torch.load(best, weights_only=True)
    del state[key]
    torch.save(state, best)
    code, err = eva8(capsys, "analyze", tmp_path / "run", "--quiet")
    assert_one_line_error(code, err, f"{best} has no {key}", "train the run again")


def test_a_best_checkpoint_naming_far_more_classes_is_refused_without_building_them(
    tmp_path, capsys, monkeypatch
):
    """A forged best.pt: CIFAR-10's weights and 200,000 class names (the issue's had 2,000,000:
    a 4 GB layer). It is refused from the shapes alone (a model on the meta device), and no
    layer for those classes is ever allocated."""
    from eva_utils import analysis

    fake_run(tmp_path / "run")
    best = tmp_path / "run" / runfolder.BEST
    state = torch.load(best, weights_only=True)
    state["classes"] = [f"class{index}" for index in range(200_000)]
    torch.save(state, best)
    built = []

    def build_model(config, num_classes):
        model = real_build_model(config, num_classes)
        built.append((next(model.parameters()).device.type, num_classes))
        return model

    real_build_model = analysis.build_model
    monkeypatch.setattr(analysis, "build_model", build_model)
    code, err = eva8(capsys, "analyze", tmp_path / "run", "--quiet")
    assert built == [("meta", 200_000)]
    line = assert_one_line_error(code, err, f"{best} holds weights of another architecture")
    assert "e.g. linear.weight" in line and "200,000 classes" in line


def test_analyze_refuses_data_whose_classes_are_not_the_checkpoints(tmp_path, capsys):
    fake_run(tmp_path / "run")  # synthetic data: CIFAR-10's ten classes
    other = write_image_folder(tmp_path / "other", per_class=8, classes=("ant", "bee", "cow"))
    code, err = eva8(capsys, "analyze", tmp_path / "run", "--data", other, "--quiet")
    line = assert_one_line_error(code, err, "best.pt was trained on the classes ['airplane'")
    assert "the data has ['ant', 'bee', 'cow']: analyze it with the run's own data" in line
    assert not (tmp_path / "run" / "analysis.json").exists()


@pytest.mark.parametrize("how", ["train", "sweep", "fit", "library sweep"])
def test_an_out_folder_name_too_long_for_a_file_system_is_one_line(how, tmp_path, capsys):
    """A folder name over 255 bytes is refused before any folder is made, not an OSError."""
    from eva_utils import fit, sweep
    from eva_utils.errors import RunFileError

    out = tmp_path / "runs" / ("x" * 300)
    if how in ("train", "sweep"):
        code, err = eva8(capsys, how, *SYNTHETIC, "--out", out)
        assert_one_line_error(code, err, "is 300 bytes", "choose a shorter --out")
    else:
        config = get_preset("session8").replace(data="synthetic", train_size=16, test_size=10,
                                                epochs=1, device="cpu")  # fmt: skip
        with pytest.raises(RunFileError, match="is 300 bytes.*choose a shorter out=") as error:
            if how == "fit":
                fit(config, out=out, progress=False)
            else:
                sweep(config, {"dropout": [0.0]}, out=out, progress=False)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["train", *SYNTHETIC, "--out", "{long}"], "--out"),
        (["train", "--resume", "{long}"], "--resume"),
        (["sweep", *SYNTHETIC, "--grid", "dropout=0", "--out", "{long}"], "--out"),
        (["sweep", "--summarize", "{long}"], "--summarize"),
        (["plot", "{metrics}", "--out", "{long}"], "--out"),
        (["compare", "{run}", "--out", "{long}.png"], "--out"),
        (["compare", "{run}", "--out", "{just_short_enough}.png"], "--out"),
    ],
    ids=["train", "resume", "sweep", "summarize", "plot", "compare", "compare-scratch"],
)
def test_an_out_name_too_long_under_an_existing_folder_is_one_line(command, flag, tmp_path, capsys):
    """A name over 255 bytes (or a file name that leaves its temporary name no room) directly
    under a folder that exists: one line naming the setting, not OSError [Errno 36]."""
    (tmp_path / "metrics.json").write_text(json.dumps(good_metrics()))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(good_metrics()))
    names = {"long": tmp_path / ("x" * 300), "just_short_enough": tmp_path / ("x" * 240),
             "metrics": tmp_path / "metrics.json", "run": tmp_path / "run"}  # fmt: skip
    before = sorted(path.name for path in tmp_path.iterdir())
    code, err = eva8(capsys, *(part.format(**names) for part in command))
    assert_one_line_error(code, err, "bytes, more than the", f"choose a shorter {flag}")
    assert sorted(path.name for path in tmp_path.iterdir()) == before
