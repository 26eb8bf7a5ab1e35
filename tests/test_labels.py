"""Labels and captions of recorded runs say what each run computed: its data with its own
hardware, and its norm layer as the ranks computed it (N ranks of BatchNorm are GBN with N ghost
batches), from metrics dicts as training writes them; no training here."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from eva_utils import config as config_module
from eva_utils import results
from eva_utils.config import Config, get_preset
from eva_utils.errors import RunFileError
from eva_utils.results import RecordedRun

from .test_bad_input import good_metrics

SESSION8 = get_preset("session8")  # GBN 2 splits of a batch of 128, dropout 0.1


def _run(name: str, config: Config, world_size: int = 1, device: str = "cpu") -> RecordedRun:
    """A recorded run of ``config`` on ``world_size`` ranks, as training records it: a single
    process writes no world_size."""
    metrics = good_metrics()
    metrics["config"] = config.to_dict()
    if world_size > 1:
        metrics["environment"].update(world_size=world_size)
    metrics["environment"]["device_name"] = device
    return RecordedRun(name, metrics)


def test_caption_pairs_each_runs_data_with_its_own_hardware():
    # sorted apart, the data and the hardware would pair "alpha" with "Apple": the wrong way
    zeta = _run("a", SESSION8.replace(data="zeta.tar.gz", train_size=500), device="Apple M2")
    alpha = _run("b", SESSION8.replace(data="alpha.tar.gz"), device="Zebra GPU")
    caption = results.comparison_caption([zeta, alpha])
    names, where = caption.split("\n")
    assert names == "a, b"
    assert where == (
        "a: zeta.tar.gz (train/test images: 500/all) on Apple M2; "
        "b: alpha.tar.gz (train/test images: all/all) on Zebra GPU"
    )


def test_caption_names_shared_data_once():
    runs = [_run(name, SESSION8, device=device) for name, device in (("a", "P"), ("b", "Q"))]
    caption = results.comparison_caption(runs)
    assert caption.split("\n")[1] == (
        "data: CIFAR-10 (torchvision) (train/test images: all/all); hardware: P; Q"
    )


@pytest.mark.parametrize(
    ("norm", "num_splits", "batch_size", "world_size", "images"),
    [("bn", 2, 128, 1, 128), ("gbn", 2, 128, 1, 64), ("bn", 2, 128, 2, 64),
     ("gbn", 1, 128, 2, 64), ("gbn", 2, 128, 2, 32), ("gbn", 2, 512, 4, 64)],
)  # fmt: skip
def test_ghost_batch_size_is_the_batch_over_ranks_and_splits(
    norm, num_splits, batch_size, world_size, images
):
    from eva_utils.labels import ghost_batch_size  # new with the labels of runs on ranks

    recorded = Config(norm=norm, num_splits=num_splits, batch_size=batch_size).to_dict()
    assert ghost_batch_size(recorded, world_size) == images


def test_batchnorm_on_two_ranks_is_labelled_as_two_ghost_batches_of_64():
    run = _run("bn-ranks", SESSION8.replace(norm="bn"), world_size=2)
    label = "2 ranks x BatchNorm = GBN (2 ghost batches of 64), dropout 0.1"
    assert results.run_label(run) == label


def test_gbn_on_two_ranks_multiplies_the_splits():
    run = _run("gbn-ranks", SESSION8, world_size=2)  # the splits were not divided: 4 of 32
    assert results.run_label(run).startswith("2 ranks x GBN 2 splits = GBN (4 ghost batches of 32)")


def test_gbn_against_bn_on_two_ranks_shows_both_are_ghost_batches_of_64():
    gbn = _run("gbn", SESSION8.replace(num_splits=1), world_size=2)  # torchrun_command's split
    bn = _run("bn", SESSION8.replace(norm="bn", dropout=0.0), world_size=2)
    assert results.comparison_labels([gbn, bn]) == [
        "2 ranks x BatchNorm = GBN (2 ghost batches of 64), dropout 0.1",
        "2 ranks x BatchNorm = GBN (2 ghost batches of 64), no dropout",
    ]


def test_one_process_beside_ranks_names_its_ghost_batches_too():
    one, ranks = _run("one", SESSION8), _run("ranks", SESSION8.replace(num_splits=1), world_size=2)
    bn = _run("bn", SESSION8.replace(norm="bn"))
    assert results.comparison_labels([one, ranks, bn]) == [
        "GBN 2 splits (ghost batches of 64), dropout 0.1",
        "2 ranks x BatchNorm = GBN (2 ghost batches of 64), dropout 0.1",
        "BatchNorm (batches of 128), dropout 0.1",
    ]


def test_single_process_labels_are_unchanged():
    runs = [_run("gbn", SESSION8), _run("bn", SESSION8.replace(norm="bn", dropout=0.0))]
    assert results.comparison_labels(runs) == ["GBN 2 splits, dropout 0.1", "BatchNorm, no dropout"]


@pytest.mark.parametrize(
    ("changes", "world_size", "preset"),
    [({}, 1, "session8"), ({"num_splits": 1}, 2, "session8"), ({"norm": "bn"}, 2, "session8"),
     ({"num_splits": 1}, 1, None), ({"norm": "bn"}, 1, None), ({}, 2, None),
     ({"num_splits": 4}, 1, None), ({"num_splits": 1, "lr": 0.1}, 2, None)],
    ids=["one-process", "splits-divided", "bn-per-rank", "bn-one-process", "bn", "undivided",
         "4-splits", "other-lr"],
)  # fmt: skip
def test_a_run_is_the_session8_recipe_when_its_ghost_batches_are(changes, world_size, preset):
    assert config_module.preset_name(SESSION8.replace(**changes), world_size=world_size) == preset
    run = _run("run", SESSION8.replace(**changes), world_size)
    assert results.recipe_label(run).startswith(f"{preset or 'custom'} recipe, ")


def test_recipe_label_reads_a_two_rank_run_folder(tmp_path):
    metrics = good_metrics()
    metrics["config"]["num_splits"] = 1
    metrics["environment"].update(world_size=2, images_per_rank=64, images_per_norm=64)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert results.recipe_label(tmp_path) == (
        "session8 recipe, 2 ranks x BatchNorm = GBN (2 ghost batches of 64), dropout 0.1"
    )


def test_a_metrics_json_without_world_size_is_one_process(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(good_metrics()))
    run = results.read_recorded_run(tmp_path)
    assert run.world_size == 1
    assert results.recipe_label(run) == "session8 recipe, GBN 2 splits, dropout 0.1"


@pytest.mark.parametrize("world_size", [0, "2", 1.5, True])
def test_a_damaged_world_size_is_refused_in_one_line(world_size, tmp_path):
    metrics = good_metrics()
    metrics["environment"]["world_size"] = world_size
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunFileError, match="world_size is .*, no number of ranks"):
        results.read_recorded_run(tmp_path)


def test_describe_run_names_the_ranks():
    run = _run("r", SESSION8.replace(num_splits=1), world_size=2)
    assert results.describe_run(run.metrics).startswith("resnet18 gbn on 2 ranks, 2 epochs, ")


@pytest.mark.parametrize(
    ("num_splits", "world_size", "recipe"),
    [(1, 2, "session8 preset on 2 ranks"), (2, 2, "custom recipe on 2 ranks"),
     (2, 1, "session8 preset")],
)  # fmt: skip
def test_the_start_line_counts_a_run_on_ranks_by_its_ghost_batches(num_splits, world_size, recipe):
    from eva_utils.precision import choose_precision
    from eva_utils.ranks import Ranks
    from eva_utils.training import start_line

    cpu = torch.device("cpu")
    state = SimpleNamespace(
        config=SESSION8.replace(num_splits=num_splits), history=[], ranks=Ranks(0, world_size),
        device=cpu, precision=choose_precision(cpu), train_set=range(64), test_set=range(32),
        val_set=None,
    )  # fmt: skip
    assert start_line(state, None).startswith(f"{recipe}, 30 epochs, on CPU")
