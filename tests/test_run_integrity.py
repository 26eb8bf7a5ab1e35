"""Reliability, round two: one run keeps one recipe, interrupts never break a checkpoint write or
start-up, unwritable or full run folders and other bad input get one line, and nothing is
left behind."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eva_utils import files, get_preset, notebook, runfolder, state
from eva_utils.cli import main
from eva_utils.config import RESUMABLE_CHANGES, Config
from eva_utils.errors import CheckpointError, Interrupted, RunFileError, TrainingDiverged
from eva_utils.training import fit

from .conftest import ROOT, cli_env, fake_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = get_preset("session8").replace(
    data="synthetic", train_size=16, test_size=10, batch_size=8, max_batches=1, device="cpu",
    epochs=1, arch="tiny",
)  # fmt: skip
# A valid other value for every field that changes what a run computes.
OTHER_VALUES = {
    "arch": "resnet34", "norm": "bn", "num_splits": 4, "dropout": 0.2, "batch_size": 4,
    "lr": 0.1, "momentum": 0.5, "nesterov": True, "weight_decay": 0.0, "decay_norm_bias": False,
    "label_smoothing": 0.1, "schedule": "onecycle", "step_size": 3, "gamma": 0.5, "warmup": 0.3,
    "augment": ("crop",), "rotate_degrees": 4.0, "tta_flip": True, "data": "elsewhere",
    "train_size": 32, "test_size": 20, "val_size": 4, "seed": 2, "loader": "torchvision",
    "channels_last": False, "precision": "fp32", "max_batches": 2,
}  # fmt: skip


def one_line_error(code: int, stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("eva8: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def eva8(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- 1. a run keeps its recipe -----------------------------------------------------------------


def test_every_field_is_either_a_recipe_field_or_allowed_to_change_on_resume():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(OTHER_VALUES) == fields - set(RESUMABLE_CHANGES)


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_resume_refuses_a_changed_recipe_field_naming_it_and_both_values(name, tmp_path):
    last = fake_checkpoint(BASE, tmp_path / "run")
    before = last.read_bytes()
    changed = BASE.replace(**{name: OTHER_VALUES[name]})
    with pytest.raises(CheckpointError) as raised:
        fit(changed, out=tmp_path / "run", resume=True, progress=False)
    message = str(raised.value)
    shown = runfolder._flag_value  # how both values are written
    # the library names the field (the CLI, its flag: --train-size 16 -> 24)
    assert f"({name} {shown(getattr(BASE, name))} -> {shown(OTHER_VALUES[name])})" in message
    assert "\n" not in message
    assert last.read_bytes() == before
    assert runfolder.read_metrics(tmp_path / "run" / "metrics.json")["config"] == BASE.to_dict()


def test_resume_may_change_epochs_device_and_workers(tmp_path):
    fake_checkpoint(BASE, tmp_path / "run")
    history = fit(
        BASE.replace(epochs=2, device="auto", num_workers=0), out=tmp_path / "run",
        resume=True, progress=False,
    )  # fmt: skip
    assert [row["epoch"] for row in history] == [1, 2]


def test_cli_resume_with_a_new_lr_is_one_line_and_changes_nothing(tmp_path, capsys):
    last = fake_checkpoint(BASE, tmp_path / "run")
    before = last.read_bytes()
    code, _, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--lr", "0.1", "--quiet")
    one_line_error(code, err, "--lr 0.016 -> 0.1", "a run keeps the recipe it started with")
    assert last.read_bytes() == before


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_notebook_run_folders_differ_for_every_recipe_change(name):
    changed = BASE.replace(**{name: OTHER_VALUES[name]})
    assert notebook.recipe_name(changed) != notebook.recipe_name(BASE)


def test_notebook_run_folder_is_the_same_for_changes_a_resume_allows():
    same = BASE.replace(epochs=30, device="cuda", num_workers=0, compile=True)
    assert notebook.recipe_name(same) == notebook.recipe_name(BASE)


@pytest.mark.parametrize("variable", ["EVA_RUN_DIR", "EVA_REFERENCE_RUN"])
def test_an_empty_notebook_folder_variable_counts_as_unset(variable, monkeypatch, tmp_path):
    """EVA_RUN_DIR='' trains in the recipe's folder, not in the current one; an empty
    EVA_REFERENCE_RUN looks where an unset one looks, not in the current folder."""
    monkeypatch.delenv("EVA_SMOKE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / runfolder.BEST).write_text("not the reference run")
    monkeypatch.setenv(variable, "")
    if variable == "EVA_RUN_DIR":
        assert notebook.run_folder("runs", BASE) == Path("runs") / notebook.recipe_name(BASE)
    else:
        monkeypatch.setattr(notebook, "_search_roots", lambda: [])
        monkeypatch.setattr(notebook.pretrained, "download", lambda: None)
        assert notebook.reference_checkpoint() is None


# --- 2. interrupts: during a checkpoint write, and at start-up ---------------------------------


class InterruptingFile:
    """A file whose third write sends ``signum`` to this process, as a Ctrl-C or a ``kill``
    would while torch.save is writing."""

    def __init__(self, file, signum: int) -> None:
        self._file, self._signum, self._writes = file, signum, 0

    def write(self, data) -> int:
        self._writes += 1
        if self._writes == 3:
            os.kill(os.getpid(), self._signum)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@pytest.fixture(params=[signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def signal_during_writes(request, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        files.os,
        "fdopen",
        lambda *a, **k: InterruptingFile(real_fdopen(*a, **k), request.param),
    )


def test_a_signal_during_the_checkpoint_write_lets_it_finish_then_stops(
    signal_during_writes, tmp_path
):
    config = BASE.replace(epochs=2)
    with pytest.raises(Interrupted, match=r"stopped in epoch 2; .*holds epoch 1: resume with"):
        fit(config, out=tmp_path / "run", progress=False)
    state = runfolder.load_checkpoint(tmp_path / "run" / runfolder.LAST)
    assert [row["epoch"] for row in state["history"]] == [1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "last.pt", "metrics.json",
    ]  # fmt: skip


def test_a_signal_during_the_checkpoint_write_exits_130_with_the_resume_hint(
    signal_during_writes, tmp_path, capsys
):
    code, _, err = eva8(
        capsys, "train", "--data", "synthetic", "--train-size", "16", "--test-size", "10",
        "--batch-size", "8", "--max-batches", "1", "--epochs", "2", "--device", "cpu",
        "--quiet", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 130
    assert err.strip().splitlines() == [
        f"eva8: stopped in epoch 2; {tmp_path / 'run' / 'last.pt'} holds epoch 1: resume "
        f"with: python -m eva_utils train --resume {tmp_path / 'run'}"
    ]


def sigterm_handler_installed(pid: int) -> bool:
    """Whether process ``pid`` catches SIGTERM (bit 15 of SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the child, as a terminal's Ctrl-C finds it: a suite started as a
    shell's background job (``make test &``) inherits SIGINT ignored, and a Python started so
    keeps ignoring it, as a program in the background should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_start_up_exits_130_with_one_line(signum, tmp_path):
    """Sent as soon as the command has taken charge of signals, while torch is still loading."""
    process = subprocess.Popen(
        [sys.executable, "-m", "eva_utils", "train", "--data", "synthetic", "--epochs", "1",
         "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not sigterm_handler_installed(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "never took charge"
        time.sleep(0.005)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("eva8: "), err
    assert "Traceback" not in err


# Started in place of ``python -m eva_utils``: the first time ``sys.argv[1]`` is imported (a
# module that ``import torch`` loads on the way), this process sends itself SIGINT, as a Ctrl-C
# in the seconds torch takes to load would. A hook, not a race: the signal lands mid-import.
INTERRUPTED_IMPORT = """
import os, signal, sys
from importlib.abc import MetaPathFinder

class InterruptAt(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

TARGET = sys.argv.pop(1)
sys.meta_path.insert(0, InterruptAt())
from eva_utils.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("module", ["torch.nn", "torch.optim", "torch.fx"])
def test_ctrl_c_while_torch_loads_exits_130_with_one_line(module, tmp_path):
    """Before, the interrupt could land inside torch's own imports, which left torch half
    loaded: a traceback (``partially initialized module 'torch'``), or a run that went on."""
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT, module, "train", "--data", "synthetic",
         "--train-size", "16", "--test-size", "8", "--max-batches", "1", "--epochs", "1",
         "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [
        "eva8: interrupted before training started: nothing was saved or changed"
    ]
    assert not (tmp_path / "run").exists()


# --- 4. unwritable and full run folders ---------------------------------------------------------


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_resume_into_a_read_only_folder_is_refused_before_training(tmp_path, monkeypatch):
    fake_checkpoint(BASE, tmp_path / "run")
    trained = []
    monkeypatch.setattr(
        state.TrainingState, "train_epoch", lambda self, epoch: trained.append(epoch)
    )
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)  # as on a read-only mount
    with pytest.raises(RunFileError, match=r"cannot write into .*run \(Read-only file system\)"):
        fit(BASE.replace(epochs=2), out=tmp_path / "run", resume=True, progress=False)
    assert trained == []


def test_a_new_run_in_a_read_only_place_is_one_line_before_loading_data(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(state, "load_datasets", lambda config: pytest.fail("loaded the data"))
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    code, _, err = eva8(capsys, "train", "--data", "synthetic", "--out", tmp_path / "run")
    one_line_error(code, err, f"cannot write into {tmp_path}", "Read-only file system")


def test_a_full_disk_on_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys
):
    last = fake_checkpoint(BASE, tmp_path / "run")
    before = last.read_bytes()

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(files.os, "fdopen", FullDisk)
    code, _, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--quiet")
    one_line_error(
        code, err, f"could not save epoch 2 into {tmp_path / 'run'} (No space left on device)",
        "the files of the epochs before are kept", f"--resume {tmp_path / 'run'}",
    )  # fmt: skip
    assert last.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "last.pt", "metrics.json",
    ]  # fmt: skip


# --- 7. output paths are checked first ----------------------------------------------------------


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def test_plot_out_that_is_a_file(a_file, tmp_path, capsys):
    fake_checkpoint(BASE, tmp_path / "run")
    code, _, err = eva8(capsys, "plot", tmp_path / "run" / "metrics.json", "--out", a_file)
    one_line_error(code, err, f"{a_file} is a file, not a folder: choose another --out")


def test_analyze_out_that_is_a_file_fails_before_analysing(a_file, tmp_path, monkeypatch, capsys):
    from eva_utils import analysis

    monkeypatch.setattr(analysis, "analyze", lambda *a, **k: pytest.fail("analysed first"))
    fake_checkpoint(BASE, tmp_path / "run")
    code, _, err = eva8(capsys, "analyze", tmp_path / "run", "--out", a_file / "sub")
    one_line_error(code, err, f"{a_file} is a file, not a folder")


def test_train_out_under_a_file(a_file, capsys):
    code, _, err = eva8(capsys, "train", "--data", "synthetic", "--out", a_file / "sub")
    one_line_error(code, err, f"{a_file} is a file, not a folder: choose another --out")
    assert a_file.read_text() == "not a folder"


def test_figures_and_compare_out_that_is_a_file(a_file, capsys):
    results = ROOT / "results" / "session8-h100"
    for command in (["figures", results, "--out", a_file], ["compare", results, "--out", a_file]):
        code, _, err = eva8(capsys, *command)
        one_line_error(code, err, f"{a_file} is a file, not a folder")


# --- 8. resuming a finished run -----------------------------------------------------------------


@pytest.mark.parametrize("epochs", ["1", "none"], ids=["equal", "unchanged"])
def test_resume_of_a_complete_run_says_so_and_writes_nothing(epochs, tmp_path, capsys):
    last = fake_checkpoint(BASE, tmp_path / "run")
    before = last.stat().st_mtime_ns
    flags = ["--epochs", epochs] if epochs != "none" else []
    code, out, err = eva8(capsys, "train", "--resume", tmp_path / "run", *flags, "--quiet")
    assert (code, err) == (0, "")
    assert "is already complete: it holds epoch 1 and --epochs is 1" in out
    assert "nothing to train" in out
    assert "wrote" not in out
    assert last.stat().st_mtime_ns == before


def test_a_complete_run_of_two_epochs_says_it_holds_epochs_1_2(tmp_path, capsys):
    fake_checkpoint(BASE.replace(epochs=2), tmp_path / "run", epochs=2)
    code, out, err = eva8(capsys, "train", "--resume", tmp_path / "run", "--quiet")
    assert (code, err) == (0, "")
    assert "is already complete: it holds epochs 1-2 and --epochs is 2" in out


# --- a last.pt that is no file, a metrics.json of another format ----------------------------------


def test_a_last_pt_that_is_a_folder_is_no_run_to_resume_and_is_refused_in_one_line(
    tmp_path, capsys
):
    (tmp_path / "run" / runfolder.LAST).mkdir(parents=True)
    assert not notebook.can_resume(tmp_path / "run")
    assert capsys.readouterr().out == ""
    flags = ["--data", "synthetic", "--train-size", "16", "--test-size", "10", "--device", "cpu"]
    for how, given in (("--out", flags), ("--resume", [])):
        code, _, err = eva8(capsys, "train", *given, "--quiet", how, tmp_path / "run")
        one_line_error(code, err, f"{tmp_path / 'run' / 'last.pt'} is not a file: remove it")
    assert (tmp_path / "run" / runfolder.LAST).is_dir()


@pytest.mark.parametrize("written", ["eva9-metrics", 2])
def test_a_metrics_json_of_another_format_is_refused_in_one_line(written, tmp_path):
    fake_checkpoint(BASE, tmp_path / "run")
    metrics = tmp_path / "run" / runfolder.METRICS
    recorded = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**recorded, "format": written}))
    with pytest.raises(RunFileError, match=f"is of the format {written!r}, not 'eva8-metrics'"):
        runfolder.read_metrics(metrics)


# --- 9. nothing left behind by smoke runs -------------------------------------------------------


def test_a_smoke_run_folder_is_removed_when_the_process_ends(tmp_path):
    script = (
        "from eva_utils import notebook, get_preset\n"
        "folder = notebook.run_folder('runs', get_preset('session8'))\n"
        "(folder / 'last.pt').write_bytes(b'x' * 1000)\n"
        "print(folder)\n"
    )
    env = {**cli_env(), "EVA_SMOKE": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_smoke_folders_of_dead_kernels_are_removed_on_the_next_start(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{notebook.SMOKE_PREFIX}abc.{dead.pid}.tmp"
    alive = tmp_path / f"{notebook.SMOKE_PREFIX}abc.{os.getppid()}.tmp"
    for folder in (stale, alive):
        folder.mkdir()
    monkeypatch.setenv("EVA_SMOKE", "1")
    monkeypatch.setattr(notebook.tempfile, "tempdir", str(tmp_path))
    folder = notebook.run_folder("runs", BASE)
    assert not stale.exists() and alive.exists() and folder.parent == tmp_path


# --- 10. smaller cases --------------------------------------------------------------------------


def test_a_device_that_cannot_train_is_one_line(capsys):
    code, _, err = eva8(capsys, "train", "--data", "synthetic", "--device", "meta", "--out", "x")
    one_line_error(code, err, "device 'meta' cannot train here", "use auto, cpu")


def test_a_metrics_json_with_a_string_for_a_number_is_one_line(tmp_path, capsys):
    fake_checkpoint(BASE, tmp_path / "run")
    path = tmp_path / "run" / "metrics.json"
    path.write_text(path.read_text().replace('"test_acc": 0.1', '"test_acc": "0.1"'))
    code, _, err = eva8(capsys, "plot", path, "--out", tmp_path / "images")
    one_line_error(code, err, "test_acc of epoch 1 is '0.1', not a number")
    assert not (tmp_path / "images").exists()


def test_divergence_from_weight_decay_is_blamed_on_the_weight_decay():
    config = BASE.replace(weight_decay=1e5, lr=0.01, train_size=32, max_batches=None, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"lower weight_decay=\.\.\.") as raised:
        fit(config, progress=False)
    assert "lr x weight_decay = 1000 is above 3.8" in str(raised.value)
    assert "lower the learning rate" not in str(raised.value)


def test_divergence_from_the_learning_rate_still_names_the_learning_rate():
    config = BASE.replace(lr=5000, train_size=32, max_batches=None, epochs=2)  # lr x wd = 2.5
    with pytest.raises(TrainingDiverged, match=r"lower the learning rate \(lr=\.\.\.\)"):
        fit(config, progress=False)


def test_environment_yml_uses_conda_forge_not_the_retired_pytorch_channel():
    text = (ROOT / "environment.yml").read_text()
    channels = text.split("channels:")[1].split("dependencies:")[0]
    assert "conda-forge" in channels
    assert "pytorch" not in channels


def test_importing_eva_utils_loads_no_torch():
    """What lets `python -m eva_utils` take charge of signals before torch loads."""
    code = "import sys, eva_utils, eva_utils.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr
