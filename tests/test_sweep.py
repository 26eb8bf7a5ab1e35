"""``sweep``: every cell of a grid x seeds as ordinary run folders, continued by running it again,
summarised against a hand computation, bad input refused in one line, and parallel runs that
share a cold data cache. Tiny synthetic runs (one batch per epoch) on a CPU: machinery, not
results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eva_utils import get_preset, sweeps
from eva_utils.cli import build_parser, config_from_args, main
from eva_utils.config import Config, field_flags
from eva_utils.errors import ConfigError
from eva_utils.results import PROVENANCE, SWEEP_JSON, recorded_runs, summarize_sweep
from eva_utils.runfolder import LAST, METRICS, read_metrics, write_metrics
from eva_utils.sweeps import SWEEP_PLAN, SWEEP_PNG, plan, record_plan, shard, sweep
from tools.readme import ablation_section

from .conftest import fake_checkpoint, run_cli, write_archive, write_image_folder
from .test_bad_input import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"data": "synthetic", "train_size": 16, "test_size": 8, "batch_size": 8, "max_batches": 1,
        "epochs": 2, "device": "cpu", "arch": "tiny"}  # fmt: skip
TINY_FLAGS = [
    "--data", "synthetic", "--train-size", "16", "--test-size", "8", "--batch-size", "8",
    "--max-batches", "1", "--epochs", "1", "--device", "cpu", "--quiet", "--arch", "tiny",
]  # fmt: skip


def test_sweep_resumes_an_interrupted_run_and_skips_complete_ones(tmp_path):
    base = get_preset("session8").replace(**TINY)
    first, second = plan(base, {"num_splits": [2]}, [1, 2], tmp_path)
    # The first run was stopped after epoch 1 (made-up numbers: 1.0 s, 10%).
    fake_checkpoint(first.config, first.folder, epochs=1)
    summary = sweep(base, {"num_splits": [2]}, [1, 2], out=tmp_path, progress=False)

    resumed = read_metrics(first.folder / METRICS)["history"]
    assert [row["epoch"] for row in resumed] == [1, 2]
    assert resumed[0]["seconds"] == 1.0  # epoch 1 kept, not trained again
    assert len(read_metrics(second.folder / METRICS)["history"]) == 2
    assert [cell["seeds"] for cell in summary["cells"]] == [[1, 2]]
    assert (tmp_path / SWEEP_JSON).is_file() and (tmp_path / SWEEP_PNG).is_file()

    saved = {run.folder: (run.folder / LAST).stat().st_mtime_ns for run in (first, second)}
    assert all(run.complete for run in plan(base, {"num_splits": [2]}, [1, 2], tmp_path))
    sweep(base, {"num_splits": [2]}, [1, 2], out=tmp_path, progress=False)
    assert {f: (f / LAST).stat().st_mtime_ns for f in saved} == saved  # nothing trained again


def test_a_changed_grid_adds_runs_in_new_folders(tmp_path):
    base = get_preset("session8").replace(**TINY)
    old = {run.folder for run in plan(base, {"dropout": [0.0, 0.1]}, [1], tmp_path)}
    new = {run.folder for run in plan(base, {"dropout": [0.0, 0.2]}, [1], tmp_path)}
    assert len(old & new) == 1 and len(old | new) == 3
    longer = {run.folder for run in plan(base.replace(epochs=3), {"dropout": [0.0]}, [1], tmp_path)}
    assert longer <= old  # more epochs continue the same runs


def _record(folder: Path, config: Config, accuracies: list[float], seconds: float = 2.0) -> None:
    history = [
        dict(epoch=epoch, train_loss=1.0, train_acc=0.5, test_loss=1.0, test_acc=acc, lr=0.01,
             seconds=seconds)
        for epoch, acc in enumerate(accuracies, start=1)
    ]  # fmt: skip
    folder.mkdir(parents=True)
    write_metrics(folder / METRICS, config, history, {"device_name": "test CPU"})


def test_summary_means_and_standard_deviations_match_a_hand_computation(tmp_path):
    bn_like = get_preset("session8").replace(num_splits=1, dropout=0.0)
    _record(tmp_path / "a1", bn_like.replace(seed=1), [0.70, 0.80, 0.79])
    _record(tmp_path / "a2", bn_like.replace(seed=2), [0.75, 0.86, 0.86])
    _record(tmp_path / "a3", bn_like.replace(seed=3), [0.72, 0.83, 0.85], seconds=5.0)
    _record(tmp_path / "b1", bn_like.replace(dropout=0.1), [0.60, 0.90, 0.88])

    summary = summarize_sweep(tmp_path)
    assert summary["varied"] == ["dropout"]
    one_split, dropout = summary["cells"]
    assert one_split["label"] == "GBN 1 split (= BatchNorm), no dropout"
    assert one_split["seeds"] == [1, 2, 3] and one_split["grid"] == {"dropout": 0.0}
    # best 0.80, 0.86, 0.85: mean 0.836667; squared deviations 0.0013444, 0.0005444, 0.0001778
    # sum 0.0020667, over n-1 = 2: 0.0010333, square root 0.032146
    assert one_split["best_acc"]["mean"] == pytest.approx(0.836667, abs=1e-6)
    assert one_split["best_acc"]["std"] == pytest.approx(0.032146, abs=1e-6)
    # final 0.79, 0.86, 0.85: mean 0.83333; deviations -0.04333, 0.02667, 0.01667; sample std
    # sqrt((0.0018778 + 0.0007111 + 0.0002778) / 2) = 0.037859
    assert one_split["final_acc"]["mean"] == pytest.approx(0.833333, abs=1e-6)
    assert one_split["final_acc"]["std"] == pytest.approx(0.037859, abs=1e-6)
    assert one_split["target_epoch"] == {"values": [None, 2, 3], "mean": None}
    assert one_split["seconds_per_epoch"]["mean"] == pytest.approx(3.0)
    assert one_split["curve"]["test_acc_mean"] == pytest.approx([0.723333, 0.83, 0.833333], 1e-5)
    assert one_split["curve"]["test_acc_std"][0] == pytest.approx(0.025166, abs=1e-6)
    # One seed: no spread is measured, rather than a misleading 0.
    assert dropout["label"] == "GBN 1 split (= BatchNorm), dropout 0.1"
    assert dropout["best_acc"] == {"values": [0.90], "mean": 0.90, "std": None}
    assert dropout["target_epoch"] == {"values": [2], "mean": 2}


def test_summarize_prints_the_table_and_writes_the_files(tmp_path, capsys):
    config = get_preset("session8")
    _record(tmp_path / "a", config.replace(seed=1), [0.80, 0.86])
    _record(tmp_path / "b", config.replace(seed=2), [0.82, 0.84])
    assert main(["sweep", "--summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GBN 2 splits, dropout 0.1  1,2    85.00% ± 1.41" in out
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["cells"][0]["runs"] == ["a", "b"]
    assert (tmp_path / SWEEP_PNG).is_file()


def test_ablation_section_shows_a_recorded_sweep(tmp_path):
    config = get_preset("session8")
    _record(tmp_path / "runs" / "a", config.replace(seed=1), [0.80, 0.86])
    _record(tmp_path / "runs" / "b", config.replace(seed=2), [0.82, 0.84])
    recorded = tmp_path / "results" / "ablation"
    recorded.mkdir(parents=True)
    (recorded / SWEEP_JSON).write_text(json.dumps(summarize_sweep(tmp_path / "runs")))
    provenance = {"command": "make ablation", "commit": "abc1234", "measured": "2026-12-01"}
    (recorded / PROVENANCE).write_text(json.dumps(provenance))
    section = ablation_section(recorded)
    assert section.startswith("1 cells x seeds 1, 2, 2 epochs on CIFAR-10 (torchvision) ")
    assert "test CPU: `make ablation` (commit abc1234, 2026-12-01)." in section
    assert "| GBN 2 splits, dropout 0.1 | 1,2 | 85.00% ± 1.41 | 85.00% ± 1.41 |" in section
    assert "sample standard deviation over the seeds (n-1" in section
    assert recorded_runs(tmp_path / "results") == []  # a sweep is not one recorded run


def test_field_flags_give_back_the_config():
    config = get_preset("fast").replace(
        train_size=100, data="x.tar.gz", precision="fp32", augment=()
    )
    args = build_parser().parse_args(["train", "--preset", "session8", *field_flags(config)])
    assert config_from_args(args) == config


# Each bad input (flags as typed) and what its one line of error says.
BAD_INPUT = {
    "--grid dropuot=0,0.1": "--grid dropuot: unknown field (did you mean dropout?)",
    "--grid dropout=0,1.5": "dropout=1.5: dropout must be in [0, 1)",
    "--grid num_splits=1,x": "--grid num_splits must be a whole number, got 'x'",
    "--grid device=cpu,cuda": "--grid device: not a recipe field",
    "--grid epochs=1,2": "--grid epochs: not a recipe field",
    "--grid seed=1,2": "give the seeds with --seeds",
    "--grid dropout=": "--grid dropout= has no values",
    "--grid dropout": "give FIELD=V1,V2",
    "--seeds 1,x": "--seeds must be a whole number, got 'x'",
    "--seeds 1,,2": "--seeds must be a whole number, got ''",
    "--grid dropout=0 --dropout 0.1": "--dropout and --grid dropout",
    "--grid dropout=0,0.0": "--grid dropout=0,0.0: dropout 0.0 is given twice",
    "--grid dropout=0 --shard ²/3": "--shard ²/3: give I/N with 1 <= I <= N",
    "--grid dropout=0 --shard 3/2": "--shard 3/2: give I/N with 1 <= I <= N",
    "--grid augment=crop+flip,flip+crop": "the grid cells augment=crop+flip and augment=flip+crop "
    "are one recipe",
    "--preset fast --grid num_splits=1,2": "the grid cells num_splits=1 and num_splits=2 are one "
    "recipe (--norm bn ignores --num-splits)",
    "--grid dropout=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --grid lr=0.1,0.2,0.3,0.4,0.5 --grid "
    "momentum=0.1,0.2,0.3,0.4,0.5 --seeds 1,2,3,4,5": "the sweep has 1,250 runs (10 x 5 x 5 x 5 "
    "values x seeds), more than the 1,000",
}


@pytest.mark.parametrize("typed", BAD_INPUT)
def test_bad_sweep_input_is_one_line(typed, tmp_path, capsys):
    code = main(["sweep", *TINY_FLAGS, "--out", str(tmp_path / "sweep"), *typed.split(" ")])
    assert_one_line_error(code, capsys.readouterr().err, BAD_INPUT[typed])
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


def test_ctrl_c_stops_the_sweep_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweeps, "fit", interrupted)
    argv = ["sweep", *TINY_FLAGS, "--grid", "dropout=0,0.1", "--out", str(tmp_path / "s")]
    assert main(argv) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "0 of 2 runs complete" in lines[0]
    assert lines[0].endswith("continue with: python -m eva_utils sweep " + " ".join(argv[1:]))


def test_parallel_runs_share_an_empty_data_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("EVA8_CACHE", str(cache))  # cli_env passes it to the subprocesses
    archive = write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    flags = [flag if flag != "synthetic" else str(archive) for flag in TINY_FLAGS]
    flags[flags.index("--train-size") + 1], flags[flags.index("--test-size") + 1] = "12", "6"
    result = run_cli(
        "sweep", *flags, "--batch-size", "4", "--grid", "dropout=0,0.1", "--parallel", "2",
        "--out", "sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    runs = sorted((tmp_path / "sweep").glob(f"*/{METRICS}"))
    assert len(runs) == 2
    assert all(len(read_metrics(path)["history"]) == 1 for path in runs)
    assert len(list(cache.iterdir())) == 1  # one extracted copy, shared by both runs
    summary = json.loads((tmp_path / "sweep" / SWEEP_JSON).read_text())
    assert [cell["grid"] for cell in summary["cells"]] == [{"dropout": 0.0}, {"dropout": 0.1}]
    assert all(math.isfinite(cell["best_acc"]["mean"]) for cell in summary["cells"])


def test_a_grid_of_100_to_the_4_is_refused_at_once_not_planned():
    grid = {name: [i / 1000 for i in range(1, 101)] for name in ("dropout", "lr", "momentum")}
    grid["weight_decay"] = [i / 1e5 for i in range(100)]
    with pytest.raises(ConfigError, match=r"the sweep has 100,000,000 runs .* than the 1,000"):
        plan(get_preset("session8"), grid, [1], "unused")


def test_grid_values_that_are_one_recipe_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"the grid's dropout: dropout 0.0 is given twice"):
        plan(get_preset("session8"), {"dropout": [0, 0.0]}, [1], tmp_path)


def test_a_cell_whose_runs_differ_in_length_says_so_in_its_label(tmp_path):
    config = get_preset("session8")
    _record(tmp_path / "a", config.replace(seed=1), [0.80, 0.86, 0.87])
    _record(tmp_path / "b", config.replace(seed=2), [0.82, 0.84])
    (cell,) = summarize_sweep(tmp_path)["cells"]
    assert cell["label"] == "GBN 2 splits, dropout 0.1 [runs of 2-3 epochs]"


def test_summarize_skips_a_foreign_run_without_a_config_with_a_note(tmp_path, capsys):
    config = get_preset("session8")
    _record(tmp_path / "a", config.replace(seed=1), [0.80, 0.86])
    _record(tmp_path / "b", config.replace(seed=2), [0.82, 0.84])
    metrics = read_metrics(tmp_path / "a" / METRICS)
    (tmp_path / "foreign").mkdir()
    foreign = {"environment": {}, "history": metrics["history"]}  # no config
    (tmp_path / "foreign" / METRICS).write_text(json.dumps(foreign))
    assert main(["sweep", "--summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'foreign'}: its metrics.json records no config" in out
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["cells"][0]["runs"] == ["a", "b"]


def test_the_sweep_figure_counts_one_seed_as_one_seed(tmp_path):
    from eva_utils.plots import plot_sweep

    config = get_preset("session8")
    _record(tmp_path / "a", config.replace(seed=1), [0.80, 0.86])
    _record(tmp_path / "b", config.replace(seed=1, dropout=0.0), [0.82, 0.84])
    figure = plot_sweep(summarize_sweep(tmp_path)["cells"])
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert all(label.endswith("(1 seed)") for label in labels[:2]), labels


def test_a_child_killed_by_sigkill_is_said_to_be_killed_not_to_have_no_output(
    tmp_path, monkeypatch
):
    """A --parallel child that the kernel kills (out of memory: SIGKILL) leaves no line in its
    log; the sweep names the signal instead of "no output"."""
    import subprocess
    import sys

    runs = plan(get_preset("session8").replace(**TINY), {"dropout": [0.0, 0.1]}, [1], tmp_path)
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(
        sweeps, "_start", lambda run, gpu=None: subprocess.Popen([sys.executable, "-c", suicide])
    )
    failed = sweeps.train_planned(runs, parallel=2, progress=False)
    assert len(failed) == 2
    for run, why in failed:
        assert why == (
            "killed by signal SIGKILL (most often: the machine ran out of memory); its log: "
            f"{tmp_path / 'logs' / run.folder.name}.log"
        )


def test_the_order_of_augmentations_is_one_recipe():
    """The loaders apply crop, flip, rotate in that order whatever the order given."""
    given = Config(augment=("rotate", "flip", "crop"))
    assert given.augment == ("crop", "flip", "rotate") == Config().augment
    assert sweeps.recipe_name(Config(augment=["flip", "crop"])) == sweeps.recipe_name(
        Config(augment=("crop", "flip"))
    )


def test_a_grid_over_data_sizes_is_described_with_every_size_not_the_first_runs(tmp_path):
    config = get_preset("session8").replace(data="synthetic")
    _record(tmp_path / "small", config.replace(train_size=1000, test_size=500), [0.5, 0.6])
    _record(tmp_path / "large", config.replace(train_size=4000, test_size=500), [0.6, 0.7])
    summary = summarize_sweep(tmp_path)
    assert summary["varied"] == ["train_size"]
    assert summary["data"] == "synthetic (train/test images: 1,000/500, 4,000/500)"
    sweeps.write_summary(tmp_path)
    assert "1,000/500, 4,000/500" in json.loads((tmp_path / SWEEP_JSON).read_text())["data"]


def test_a_foreign_runs_long_label_is_wrapped_and_leaves_the_plot_its_width(tmp_path):
    """A run of another recipe in the sweep's folder is labelled by every field it differs in;
    the legend, inside the plot, must not squeeze the plot to a sliver."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from eva_utils.plots import plot_sweep

    config = get_preset("session8")
    _record(tmp_path / "a", config, [0.80, 0.86])
    changes = dict(lr=0.05, momentum=0.8, weight_decay=1e-3, batch_size=256, train_size=10000,
                   test_size=2000, augment=("crop",), gamma=0.5)  # fmt: skip
    foreign = config.replace(seed=2, **changes)
    _record(tmp_path / "foreign", foreign, [0.82, 0.84])
    cells = summarize_sweep(tmp_path)["cells"]
    assert max(len(cell["label"]) for cell in cells) > 100
    figure = plot_sweep(cells, "title")
    FigureCanvasAgg(figure).draw()
    axes = figure.axes[0].get_window_extent()
    legend = figure.axes[0].get_legend().get_window_extent()
    assert axes.width > 0.8 * figure.bbox.width and legend.width < axes.width


def test_summarize_skips_a_damaged_run_with_its_reason_and_summarises_the_others(tmp_path, capsys):
    """A metrics.json nested 100,000 deep (RecursionError in the JSON reader) is one run's
    problem, said in one line; the sweep's other runs are still summarised."""
    config = get_preset("session8")
    _record(tmp_path / "a", config.replace(seed=1), [0.80, 0.86])
    _record(tmp_path / "b", config.replace(seed=2), [0.82, 0.84])
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / METRICS).write_text("[" * 100_000 + "]" * 100_000)
    assert main(["sweep", "--summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'damaged'}: {tmp_path / 'damaged' / METRICS} nests its" in out
    assert json.loads((tmp_path / SWEEP_JSON).read_text())["cells"][0]["runs"] == ["a", "b"]


def test_summarize_names_the_planned_runs_a_shard_left_missing_and_the_runs_not_planned(
    tmp_path, capsys
):
    """Shard 1 of 2 trained with one grid, shard 2 never ran and another grid's run is in the
    folder: the summary (sweep.json and its lines) names the missing run and the foreign one."""
    base = get_preset("session8").replace(**TINY)
    planned = plan(base, {"dropout": [0.0, 0.1]}, [1], tmp_path)
    record_plan(planned, tmp_path)
    trained, missing = shard(planned, 1, 2)[0], shard(planned, 2, 2)[0]
    _record(trained.folder, trained.config, [0.5])
    foreign = plan(base, {"dropout": [0.3]}, [1], tmp_path)[0]
    _record(foreign.folder, foreign.config, [0.4])
    assert main(["sweep", "--summarize", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"missing 1 of the 2 planned runs (first: {missing.folder})" in out
    assert f"1 runs summarised are not in the plan recorded in {tmp_path / SWEEP_PLAN}" in out
    summary = json.loads((tmp_path / SWEEP_JSON).read_text())
    assert summary["missing"] == [missing.folder.name]
    assert summary["foreign"] == [foreign.folder.name]
