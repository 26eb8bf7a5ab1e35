"""`eva8 compare` and eva_utils.compare: several runs' validation curves in one figure, labelled
from their configs, and a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import eva_utils
from eva_utils.cli import main
from eva_utils.results import RecordedRun, comparison_labels, read_recorded_run

from .test_bad_input import good_metrics

ROOT = Path(__file__).resolve().parents[1]
GBN, BN = ROOT / "results" / "session8-h100", ROOT / "results" / "session8-bn-nodropout-h100"


def test_compare_command_writes_the_overlay_and_prints_the_table(tmp_path, capsys):
    assert main(["compare", str(GBN), str(BN), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "label", "best", "(epoch)", "final", "85%", "first",
                                "s/epoch"]  # fmt: skip
    assert lines[1].startswith("session8-h100 ") and "GBN 2 splits, dropout 0.1" in lines[1]
    assert "87.78% (29)" in lines[1] and "epoch 16" in lines[1]
    assert lines[2].startswith("session8-bn-nodropout-h100 ") and "BatchNorm, no dropout" in out
    png = tmp_path / "c" / "comparison.png"
    assert lines[-1] == f"wrote {png}"
    with Image.open(png) as image:
        assert image.size[0] > 1000 and len(image.convert("L").getcolors(maxcolors=256) or []) > 50


def test_compare_writes_to_a_png_path_and_is_deterministic(tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert main(["compare", str(GBN), str(BN), "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_labels_say_what_differs():
    runs = [
        read_recorded_run(GBN),
        read_recorded_run(BN),
        read_recorded_run(ROOT / "results" / "fast-h100"),
    ]
    assert comparison_labels(runs[:2]) == ["GBN 2 splits, dropout 0.1", "BatchNorm, no dropout"]
    assert comparison_labels(runs) == [
        "session8: GBN 2 splits, dropout 0.1", "session8: BatchNorm, no dropout",
        "fast: BatchNorm, no dropout",
    ]  # fmt: skip
    cpu = read_recorded_run(ROOT / "results" / "session8-cpu")
    assert comparison_labels([runs[0], cpu])[1] == (
        "GBN 2 splits, dropout 0.1, epochs 10, train_size 10000, test_size 2000"
    )


def test_the_library_function_returns_the_figure_and_table():
    figure, table = eva_utils.compare(GBN, BN)
    assert len(figure.axes) == 2 and "87.82% (29)" in table


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "holds no metrics.json"),
        (lambda p: p.mkdir() or (p / "metrics.json").write_text("{not json"), "is not valid JSON"),
        (lambda p: p.mkdir() or (p / "metrics.json").write_text('{"history": []}'),
         "is not an eva8 metrics.json"),
        (lambda p: None, "is not a run folder"),
    ],
    ids=["no-metrics", "corrupt", "empty-history", "missing"],
)  # fmt: skip
def test_bad_runs_get_one_line(make, message, tmp_path, capsys):
    bad = tmp_path / "bad"
    make(bad)
    code = main(["compare", str(GBN), str(bad), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("eva8: error: ") and message in err
    assert not (tmp_path / "c").exists()


def _run(name: str, config: dict | None, seed: int = 0) -> RecordedRun:
    history = [
        {"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0 + seed / 100,
         "test_acc": 0.5 + seed / 100, "lr": 0.1, "seconds": 1.0}
        for e in (1, 2, 3)
    ]  # fmt: skip
    metrics = {"environment": {"device_name": "cpu"}, "history": history}
    return RecordedRun(name, metrics if config is None else {**metrics, "config": config})


def test_a_run_without_config_is_labelled_unknown_recipe():
    known = _run("known", read_recorded_run(GBN).config)
    assert comparison_labels([_run("bare", None), known]) == [
        "unknown recipe",
        "GBN 2 splits, dropout 0.1",
    ]


def test_twenty_runs_have_distinct_lines_and_a_legend_outside_both_plots():
    runs = [_run(f"run{i}", {"norm": "bn", "seed": i}, seed=i) for i in range(20)]
    figure, _ = eva_utils.compare(*runs)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # lay out, so that the extents are final
    for ax in figure.axes:
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("target")]
        assert len(lines) == 20
        assert len({(line.get_color(), line.get_linestyle(), line.get_marker())
                    for line in lines}) == 20  # fmt: skip
    (legend,) = figure.legends
    assert len(legend.get_texts()) == 21  # the runs and the target line
    box = legend.get_window_extent(renderer)
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))


def test_compare_refuses_more_runs_than_it_can_tell_apart(tmp_path, capsys):
    code = main(["compare", *[str(GBN)] * 41, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eva8: error: compare draws at most 40 runs"), err
    assert not (tmp_path / "c").exists()


def test_runs_whose_folders_share_a_name_are_told_apart_by_their_paths(tmp_path, capsys):
    """a/run and b/run are labelled a/run and b/run, not run twice."""
    for parent in ("a", "b"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "metrics.json").write_bytes(
            (GBN / "metrics.json").read_bytes()
        )
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "c.png")]) == 0
    rows = capsys.readouterr().out.splitlines()[1:3]
    assert rows[0].startswith("a/run ") and "GBN 2 splits, dropout 0.1 (a/run)" in rows[0]
    assert rows[1].startswith("b/run ") and "GBN 2 splits, dropout 0.1 (b/run)" in rows[1]


def test_the_same_run_given_twice_is_refused_in_one_line(tmp_path, capsys):
    code = main(["compare", str(GBN), str(GBN / "metrics.json"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{GBN} is given twice: compare different runs" in err
    assert not (tmp_path / "c").exists()


def test_compare_draws_a_run_whose_folder_name_is_not_utf8(tmp_path, capsys):
    """A folder name with a byte that is no UTF-8 (made on another system): shown escaped in
    the table and the figure, not a matplotlib traceback."""
    run = tmp_path / os.fsdecode(b"run-\xff")
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(good_metrics()))
    assert main(["compare", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("run-\\xff ")
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
