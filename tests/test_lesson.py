"""What the main notebook shows and does besides calling fit (``eva_utils.lesson``): the code it
shows is the code that runs, the curves are redrawn in one output, a machine with several GPUs
trains once on all of them, and Kaggle's input data is found."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest
import torch

import eva_utils
from eva_utils import colab, engine, gbn, lesson, model, notebook, recipe, state, step
from eva_utils.config import get_preset
from eva_utils.runfolder import METRICS
from eva_utils.training import fit

from .test_notebooks import MAIN, code_cells

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = get_preset("session8").replace(
    arch="tiny", data="synthetic", train_size=64, test_size=32, batch_size=16, epochs=2,
    device="cpu", precision="fp32",
)  # fmt: skip


def shown_cells() -> list:
    return [cell for cell in code_cells(MAIN) if "lesson.show_code(" in cell.source]


def shown_objects(cell) -> list:
    """The objects a ``lesson.show_code(eva_utils.x.Y, ...)`` cell shows, looked up by name."""
    (call,) = [node for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Call)]
    objects = []
    for argument in call.args:
        obj = eva_utils
        for name in ast.unparse(argument).split(".")[1:]:
            obj = getattr(obj, name)
        objects.append(obj)
    return objects


def test_the_notebook_shows_the_block_the_network_ghost_batch_norm_the_recipe_and_the_step():
    shown = [obj for cell in shown_cells() for obj in shown_objects(cell)]
    wanted = [model.BasicBlock, model.ResNet, gbn.GhostBatchNorm2d.forward, recipe.build_optimizer,
              recipe.build_scheduler, engine.train, step.Step.train]  # fmt: skip
    assert [obj for obj in wanted if obj not in shown] == []


def test_each_listing_stored_in_the_notebook_is_the_source_that_runs_today():
    """A listing is rendered from the running module; the stored one must be today's source
    (make notebook-outputs after a change), or the notebook shows code that no longer runs."""
    for cell in shown_cells():
        stored = [
            o["data"]["text/markdown"] for o in cell.outputs if "text/markdown" in o.get("data", {})
        ]
        assert stored == [lesson.show_code(*shown_objects(cell)).data], cell.source


def test_the_shown_step_has_forward_loss_zero_grad_backward_and_step_as_lines_of_their_own():
    lines = [line.strip() for line in lesson.source(step.Step.train).splitlines()]
    for line in ("logits = self.model(images)", "loss = self.loss_fn(logits, labels)",
                 "optimizer.zero_grad(set_to_none=True)", "weighted.backward()",
                 "optimizer.step()"):  # fmt: skip
        assert line in lines
    assert "step.train(images, labels, optimizer)" in lesson.source(engine.train)


def test_training_builds_with_the_shown_recipe_and_trains_through_the_shown_step(monkeypatch):
    assert state.build_model is recipe.build_model
    assert state.build_optimizer is recipe.build_optimizer
    assert state.build_scheduler is recipe.build_scheduler
    assert state.train is engine.train
    network = recipe.build_model(get_preset("session8"))
    assert any(isinstance(m, model.BasicBlock) for m in network.modules())
    ghosts = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert ghosts and all(type(m).forward is gbn.GhostBatchNorm2d.forward for m in ghosts)
    calls = []
    shown = step.Step.train

    def counted(self, images, labels, optimizer):
        calls.append(len(labels))
        return shown(self, images, labels, optimizer)

    monkeypatch.setattr(step.Step, "train", counted)
    fit(TINY.replace(epochs=1), progress=False)
    assert calls == [16, 16, 16, 16]  # every batch of the epoch went through it


class Handle:
    """IPython's DisplayHandle, recording its updates."""

    def __init__(self, shown: list) -> None:
        self.shown = shown

    def update(self, figure) -> None:
        self.shown.append(("update", figure))


@pytest.fixture
def displayed(monkeypatch) -> list:
    shown = []

    def display(figure, display_id=False):
        assert display_id is True  # an output the next epoch can replace
        shown.append(("display", figure))
        return Handle(shown)

    monkeypatch.setattr(lesson, "display", display)
    return shown


def test_live_curves_draw_once_then_redraw_the_same_output_after_each_epoch(displayed):
    history = fit(TINY.replace(epochs=3), progress=False, on_epoch=lesson.LiveCurves())
    assert [kind for kind, _ in displayed] == ["display", "update", "update"]
    lines = displayed[-1][1].axes[0].lines
    assert list(lines[0].get_xdata()) == [1, 2, 3]
    assert list(lines[0].get_ydata()) == [row["test_loss"] for row in history]


def test_curves_of_a_resumed_run_start_from_the_epochs_it_already_has(tmp_path, displayed):
    fit(TINY, out=tmp_path / "run", progress=False)
    curves = lesson.live_curves(tmp_path / "run")
    fit(TINY.replace(epochs=3), out=tmp_path / "run", resume=True, progress=False, on_epoch=curves)
    assert [row["epoch"] for row in curves.history] == [1, 2, 3]
    assert len(displayed) == 1


def test_a_machine_with_two_gpus_trains_once_with_torchrun(
    tmp_path, monkeypatch, capsys, displayed
):
    """Two processes on the CPU stand in for two GPUs: the same torchrun command, one run."""
    monkeypatch.setenv("EVA_DIST_TIMEOUT", "30")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    history = lesson.train(TINY.replace(device="auto"), "runs/tiny", gpus=2)
    said = capsys.readouterr().out
    assert "2 GPUs x BatchNorm = ghost batches of 8 images" in said
    assert (
        "torchrun --standalone --nproc-per-node=2 -m eva_utils train --out runs/tiny-2gpus" in said
    )
    recorded = json.loads((tmp_path / "runs" / "tiny-2gpus" / METRICS).read_text())
    assert recorded["config"]["num_splits"] == 1  # GBN's 2 splits divided among the 2 ranks
    assert [row["epoch"] for row in history] == [1, 2] == [r["epoch"] for r in recorded["history"]]
    assert not (tmp_path / "runs" / "tiny").exists()  # trained once, not also on one device
    assert displayed and displayed[-1][0] in ("display", "update")


def test_one_device_trains_with_fit_into_the_run_folder(tmp_path, displayed):
    history = lesson.train(TINY, tmp_path / "run")
    assert [row["epoch"] for row in history] == [1, 2] and (tmp_path / "run" / METRICS).is_file()
    assert not (tmp_path / "run-2gpus").exists()


def test_the_gpu_section_says_what_a_two_gpu_run_of_either_norm_is():
    session8 = get_preset("session8")
    said = lesson.multi_gpu_note(session8, "runs/x", gpus=0)
    assert said.startswith("No GPU here: the training cell trained in one process")
    assert "--nproc-per-node=2" in said and "ghost batches of 64 images" in said
    assert "0 GPU" not in said and "-0gpus" not in said
    plain = lesson.multi_gpu_note(session8.replace(norm="bn"), "runs/x", gpus=1)
    assert "ghost batches of 64 images (batch 128, one GPU's run: ghost batches of 128)" in plain
    assert lesson.multi_gpu_note(session8, "runs/x", gpus=2).startswith("2 GPUs here: the training")


def test_the_lesson_size_follows_the_device_and_the_assignment_is_30_epochs_of_everything():
    assert notebook.run_size(True, "cpu") == {"epochs": 3, "train_size": 5000, "test_size": 1000}
    assert notebook.run_size(False, "cpu") == {"epochs": 30, "train_size": None, "test_size": None}


def test_kaggle_input_data_is_found_and_said(tmp_path, monkeypatch, capsys):
    data = tmp_path / "input" / "cifar-10-jpg" / "cifar10"
    for split in ("train", "test"):
        (data / split / "cat").mkdir(parents=True)
    (tmp_path / "input" / "other" / "notes").mkdir(parents=True)
    monkeypatch.setenv(colab.KAGGLE_INPUT_ENV, str(tmp_path / "input"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.delenv(notebook.SMOKE_ENV, raising=False)
    assert colab.kaggle_data() == data
    assert notebook.notebook_config("session8", data=None).data == str(data)
    assert f"Kaggle: CIFAR-10 from this notebook's input {data}" in capsys.readouterr().out
    assert notebook.notebook_config("session8", data="synthetic").data == "synthetic"


def test_kaggle_without_input_data_downloads_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(colab.KAGGLE_INPUT_ENV, str(tmp_path / "input"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.delenv(notebook.SMOKE_ENV, raising=False)
    assert colab.kaggle_data() is None
    assert notebook.notebook_config("session8", data=None).data is None
    assert "no CIFAR-10 among this notebook's inputs" in capsys.readouterr().out


def test_the_device_is_named_without_repeating_the_no_gpu_warning(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert colab.KAGGLE_GPU_ADVICE in notebook.device_report("cpu")
    assert "WARNING" not in notebook.device_report("cpu", advice=False)


def test_the_gallery_says_when_it_shows_a_short_runs_mistakes(tmp_path, capsys):
    fit(TINY, out=tmp_path / "run", progress=False)
    notebook.gallery_model(tmp_path / "run", TINY)
    assert "not the trained reference model: a run of 2 epoch(s) on 64" in capsys.readouterr().out


def test_the_stored_notebook_was_made_by_make_notebook_outputs_not_by_hand():
    """Every code cell that ran has the outputs nbconvert wrote: an execution count, in order."""
    counts = [
        cell.execution_count for cell in nbformat.read(MAIN, 4).cells if cell.cell_type == "code"
    ]
    assert counts == list(range(1, len(counts) + 1))
