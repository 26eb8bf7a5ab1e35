"""Recorded runs and how they compare: the README's results table, its captions and the
``compare`` figure, all generated from files.

A recorded run is a folder ``results/<name>/`` holding the run's ``metrics.json`` exactly as
training wrote it (a measured run is never edited) and ``provenance.json``: where, when and how
it was measured (hardware, commit, command). A *peer* run is not this project's: its folder
holds ``history.json`` (epoch, test_acc, test_loss, seconds per epoch) and a provenance that
describes the independent pipeline, for comparison rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    GRID_FIELDS,
    LABEL_FIELDS,
    TARGET_ACCURACY,
    Config,
    recipe_name,
    upgrade_config_dict,
)
from .errors import ConfigError, RunFileError, quoted, spelled
from .files import printable, read_json
from .labels import NORM_FIELDS, base_preset, norm_label, recipe_preset, same_value, shown_value
from .plots import MAX_COMPARED, plot_comparison
from .runfolder import BEST_ON, METRICS, best_key, best_row, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROVENANCE = "provenance.json"
SWEEP_JSON = "sweep.json"
SWEEP_FORMAT = "eva8-sweep"
STD_MEANING = (
    "sample standard deviation over the seeds (n-1 in the denominator); null for a cell with "
    "one seed, where no spread can be measured"
)
PEER_HISTORY = "history.json"
UNKNOWN_RECIPE, UNKNOWN_DATA = "unknown recipe", "unknown data"


@dataclass(frozen=True)
class RecordedRun:
    """One run's numbers (``metrics``: a metrics.json, or a peer's history) and provenance."""

    name: str
    metrics: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where it was read from, resolved

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metrics["history"]

    @property
    def config(self) -> dict[str, Any]:
        """The run's config as recorded, with today's field names (an ``amp`` switch reads as
        its ``precision``; {} when its metrics.json has none); a peer's data fields come from
        its provenance."""
        return upgrade_config_dict(
            self.metrics.get("config") or (self.provenance if self.peer else {})
        )

    @property
    def peer(self) -> bool:
        return bool(self.provenance.get("peer"))

    @property
    def hardware(self) -> str:
        recorded = self.provenance.get("hardware") or self.metrics["environment"].get("device_name")
        return recorded or "unknown hardware"

    @property
    def world_size(self) -> int:
        """The ranks it trained on (torchrun); 1 where metrics.json records none: one process."""
        return self.metrics.get("environment", {}).get("world_size", 1)

    def summary(self) -> dict[str, Any]:
        return summarize_history(self.history)


def summarize_history(history: list[dict], target: float = TARGET_ACCURACY) -> dict[str, Any]:
    """Best (chosen on ``best_on``) and final test accuracy, the first epoch to reach ``target``."""
    best = best_row(history)
    reached = next((row["epoch"] for row in history if row["test_acc"] >= target), None)
    return {
        "best_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "best_on": BEST_ON[best_key(history)],  # "validation", or "test" (optimistic)
        "best_val_acc": best.get("val_acc"),  # None without a validation split
        "final_acc": history[-1]["test_acc"],
        "epochs": len(history),
        "target": target,
        "target_epoch": reached,
        "seconds_per_epoch": sum(row["seconds"] for row in history) / len(history),
    }


def target_reached(summary: dict[str, Any], never: str = "not reached") -> str:
    """When a run first reached its target: "epoch E", or ``never``."""
    return f"epoch {summary['target_epoch']}" if summary["target_epoch"] else never


def describe_data(config: dict[str, Any]) -> tuple[str, str]:
    """(data source name, "train/test" image counts) of a run's config, for captions and tables."""
    if not config:
        return UNKNOWN_DATA, "?"
    sizes = "/".join(
        f"{config.get(k):,}" if config.get(k) else "all" for k in ("train_size", "test_size")
    )
    source = Path(config["data"]).name if config.get("data") else "CIFAR-10 (torchvision)"
    return source, sizes


def describe_run(metrics: dict[str, Any]) -> str:
    """One line naming a run: preset-like recipe, data, epochs and hardware."""
    config, env = metrics.get("config", {}), metrics.get("environment", {})
    source, sizes = describe_data(config)
    ranks = f" on {env['world_size']} ranks" if env.get("world_size", 1) > 1 else ""
    return (
        f"{config.get('arch', '?')} {config.get('norm', '?')}{ranks}, "
        f"{len(metrics['history'])} epochs, "
        f"{sizes} train/test images of {source}, {env.get('device_name', '?')}"
    )


def read_recorded_run(folder: str | Path) -> RecordedRun:
    """The run in ``folder`` (a run folder written by ``train``, or ``results/NAME``), or the
    folder of a ``metrics.json`` path. Raises RunFileError, in one line, when it holds none."""
    folder = Path(folder)
    if folder.name == METRICS and folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise RunFileError(f"{folder} is not a run folder: give runs/NAME or results/NAME")
    provenance = read_provenance(folder / PROVENANCE)
    if provenance.get("peer") and not (folder / METRICS).exists():
        metrics = _read_peer_history(folder / PEER_HISTORY)
    elif (folder / METRICS).exists():
        metrics = read_metrics(folder / METRICS)
    else:
        raise RunFileError(
            f"{folder} holds no {METRICS}: give a run folder written by "
            "python -m eva_utils train (runs/NAME) or results/NAME"
        )
    return RecordedRun(printable(folder.name), metrics, provenance, folder.resolve())


def read_provenance(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    provenance = read_json(path, "give a run folder of results/")
    if not isinstance(provenance, dict):
        raise RunFileError(f"{path} is not a provenance record (a JSON object)")
    if not isinstance(provenance.get("hardware", ""), str):
        raise RunFileError(
            f"{path}: hardware is {provenance['hardware']!r}, not text: write it as a string "
            'such as "NVIDIA H100 80GB HBM3"'
        )
    return provenance


def _read_peer_history(path: Path) -> dict[str, Any]:
    peer = read_json(path, "give a run folder of results/")
    keys = ("epoch", "test_acc", "test_loss", "seconds")
    history = peer.get("history") if isinstance(peer, dict) else None
    if not history or not all(isinstance(row, dict) and set(keys) <= row.keys() for row in history):
        raise RunFileError(f"{path} is not a peer history (epochs with {', '.join(keys)})")
    return peer


def recorded_runs(folder: str | Path = "results") -> list[RecordedRun]:
    """Every run under ``folder``, in the order their provenance gives (then by name)."""
    folders = sorted(
        path.parent
        for pattern in (f"*/{METRICS}", f"*/{PROVENANCE}")
        for path in Path(folder).glob(pattern)
    )
    # A sweep's summary (results/ablation) has a provenance too, but is many runs, not one.
    runs = [read_recorded_run(path) for path in dict.fromkeys(folders)
            if not (path / SWEEP_JSON).exists()]  # fmt: skip
    return sorted(runs, key=lambda run: (run.provenance.get("order", len(runs)), run.name))


# --- comparing runs ----------------------------------------------------------------------------


def run_label(run: RecordedRun, others: Sequence[RecordedRun] = ()) -> str:
    """A label that says what sets ``run`` apart from ``others``: always its norm layer as
    computed and dropout ("GBN 2 splits, dropout 0.1", "BatchNorm, no dropout"; on 2 ranks
    "2 ranks x BatchNorm = GBN (2 ghost batches of 64), ..."), with the images per BatchNorm
    where any of the runs trained on several ranks, then its preset where the runs follow
    different presets, else each other recipe field in which they differ."""
    if run.peer:
        return "peer: pytorch-cifar's own pipeline"
    if not run.config:  # a metrics.json without a config: say so rather than guess BatchNorm
        return UNKNOWN_RECIPE
    mine = [o for o in others if not o.peer and o.config]
    ghost_sizes = any(o.world_size > 1 for o in (run, *mine))
    config, label = run.config, norm_label(run.config, run.world_size, ghost_sizes)
    differing = [
        key
        for key in LABEL_FIELDS
        if key not in NORM_FIELDS
        and any(not same_value(config.get(key), o.config.get(key)) for o in mine)
    ]
    if not differing:
        return label
    presets = {base_preset(o.config) for o in mine} | {base_preset(config)}
    if None not in presets and len(presets) > 1:
        return f"{base_preset(config)}: {label}"
    shown = ", ".join(f"{key} {shown_value(config.get(key))}" for key in differing)
    return f"{label}, {shown}"


def comparison_labels(runs: Sequence[RecordedRun]) -> list[str]:
    """Labels for ``runs`` compared together; the run's name is added where two would match."""
    labels = [run_label(run, [o for o in runs if o is not run]) for run in runs]
    return [
        f"{label} ({run.name})" if labels.count(label) > 1 else label
        for run, label in zip(runs, labels)
    ]


def comparison_table(runs: Sequence[RecordedRun]) -> str:
    """A plain-text table of the compared runs: best, final, target epoch and s/epoch."""
    rows = [("run", "label", "best (epoch)", "final", f"{TARGET_ACCURACY:.0%} first", "s/epoch")]
    for run, label in zip(runs, comparison_labels(runs)):
        s = run.summary()
        rows.append(
            (run.name, label, f"{s['best_acc']:.2%} ({s['best_epoch']})", f"{s['final_acc']:.2%}",
             target_reached(s), f"{s['seconds_per_epoch']:.1f}")
        )  # fmt: skip
    return _aligned(rows)


def _aligned(rows: Sequence[Sequence[str]]) -> str:
    """Rows of text cells as a plain-text table, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def comparison_caption(runs: Sequence[RecordedRun]) -> str:
    """A figure title naming the runs' data and hardware: each once where all runs share the
    one or the other, else each pair of data and hardware with the runs it measured."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for run in runs:
        source = "{} (train/test images: {})".format(*describe_data(run.config))
        pairs.setdefault((source, run.hardware), []).append(run.name)
    sources, hardware = ({pair[i] for pair in pairs} for i in (0, 1))
    if len(sources) == 1 or len(hardware) == 1:  # nothing to pair up
        where = f"data: {'; '.join(sorted(sources))}; hardware: {'; '.join(sorted(hardware))}"
    else:
        where = "; ".join(f"{', '.join(names)}: {source} on {device}"
                          for (source, device), names in pairs.items())  # fmt: skip
    return f"{', '.join(run.name for run in runs)}\n{where}"


def recipe_label(run: str | Path | RecordedRun) -> str:
    """What ``run`` (a run folder, ``results/NAME``, or a recorded run) trained, in one line:
    "session8 recipe, 2 ranks x BatchNorm = GBN (2 ghost batches of 64), dropout 0.1". Its
    preset counts a run on N ranks by its ghost batches; "custom recipe" where none matches."""
    run = run if isinstance(run, RecordedRun) else read_recorded_run(run)
    if run.peer or not run.config:
        return run_label(run)
    preset = recipe_preset(run.config, run.world_size)
    return f"{preset or 'custom'} recipe, {norm_label(run.config, run.world_size)}"


def compare(*runs: str | Path | RecordedRun, title: str = "") -> tuple[Figure, str]:
    """Overlay the validation curves of ``runs`` (run folders, ``results/NAME`` folders or
    recorded runs) in one figure; returns (figure, comparison table as text)."""
    if not runs:
        raise RunFileError("compare needs at least one run folder")
    if len(runs) > MAX_COMPARED:
        raise ConfigError(
            f"compare draws at most {MAX_COMPARED} runs in one figure (more repeat colours and "
            f"line styles), got {len(runs)}: compare them in groups"
        )
    recorded = _named_apart(
        [run if isinstance(run, RecordedRun) else read_recorded_run(run) for run in runs]
    )
    figure = plot_comparison(
        [run.history for run in recorded], comparison_labels(recorded),
        title or comparison_caption(recorded),
    )  # fmt: skip
    return figure, comparison_table(recorded)


def _named_apart(runs: Sequence[RecordedRun]) -> list[RecordedRun]:
    """``runs``, each read from a folder named by the shortest tail of its path that no other's
    ends in (``a/run`` and ``b/run``, not ``run`` twice). One folder given twice is refused."""
    parts = [run.folder.parts if run.folder else (run.name,) for run in runs]
    for i, run in enumerate(runs):
        if run.folder is not None and parts.index(run.folder.parts) != i:
            raise ConfigError(f"{run.folder} is given twice: compare different runs")

    def tail(i: int) -> str:
        others = [other for j, other in enumerate(parts) if j != i]
        length = next(n for n in range(1, len(parts[i]) + 1)
                      if all(other[-n:] != parts[i][-n:] for other in others))  # fmt: skip
        return printable(str(Path(*parts[i][-length:])))

    return [replace(run, name=tail(i)) if run.folder else run for i, run in enumerate(runs)]


# --- sweeps: several seeds of each cell of a grid ----------------------------------------------


def summarize_sweep(folder: str | Path) -> dict[str, Any]:
    """The runs under ``folder`` (``*/metrics.json``) grouped into cells, runs whose recipes
    differ only in the seed: per cell its grid values, seeds, best and final test accuracy
    (mean and sample std over the seeds), the epoch the target was first reached, seconds per
    epoch, and the mean test accuracy curve. The content of a sweep's ``sweep.json``."""
    folder = Path(folder)
    runs, skipped = [], []
    for path in sorted(folder.glob(f"*/{METRICS}")):
        try:
            run = read_recorded_run(path.parent)
        except RunFileError as error:  # one damaged run must not hide the others
            skipped.append({"run": path.parent.name, "why": str(error)})
            continue
        if "seed" in run.config:
            runs.append(run)
        else:
            skipped.append({"run": run.name, "why": f"its {METRICS} records no config (not a "
                                                    "run of this sweep)"})  # fmt: skip
    if not runs:
        again = spelled(f"python -m eva_utils sweep --out {quoted(folder)} ...",
                        f"sweep(..., out={str(folder)!r})")  # fmt: skip
        raise RunFileError(f"{folder} holds no runs (*/{METRICS}): train them with {again}")
    cells: dict[str, list[RecordedRun]] = {}
    for run in runs:  # a cell's name: the recipe's folder name with the seed left out
        cell = recipe_name(Config.from_dict(run.config).replace(seed=0)).rsplit("-", 1)[1]
        cells.setdefault(cell, []).append(run)
    # One run per cell with the seed blanked, so that labels and grid values ignore the seed.
    cell_runs = [
        RecordedRun(members[0].name, {**members[0].metrics, "config": {**members[0].config,
                                                                        "seed": None}})
        for members in cells.values()
    ]  # fmt: skip
    varied = [
        key
        for key in GRID_FIELDS
        if any(
            not same_value(run.config.get(key), cell_runs[0].config.get(key)) for run in cell_runs
        )
    ]
    labels = comparison_labels(cell_runs)
    summaries = [
        _cell_summary(label, {key: run.config.get(key) for key in varied}, members)
        for label, run, members in zip(labels, cell_runs, cells.values())
    ]
    summaries.sort(key=lambda cell: [(value is None, value) for value in cell["grid"].values()])
    configs = {run.name: run.config for run in runs}
    data: dict[str, dict[str, None]] = {}  # each source's image counts, once each, by cell
    for cell in summaries:  # a grid over train_size has several
        source, sizes = describe_data(configs[cell["runs"][0]])
        data.setdefault(source, {})[sizes] = None
    return {
        "format": SWEEP_FORMAT,
        "target": TARGET_ACCURACY,
        "std": STD_MEANING,
        "varied": varied,
        "data": "; ".join(f"{k} (train/test images: {', '.join(v)})" for k, v in data.items()),
        "hardware": sorted({run.hardware for run in runs}),
        "cells": summaries,
        "skipped": skipped,
    }


def _cell_summary(
    label: str, grid: dict[str, Any], members: Sequence[RecordedRun]
) -> dict[str, Any]:
    members = sorted(members, key=lambda run: run.config["seed"])
    summaries = [run.summary() for run in members]
    reached = [s["target_epoch"] for s in summaries]
    common = min(len(run.history) for run in members)  # a run still training has fewer epochs
    per_epoch = [[run.history[i]["test_acc"] for run in members] for i in range(common)]
    lengths = sorted({len(run.history) for run in members})
    if len(lengths) > 1:  # its spread mixes runs of different lengths: say so where it is read
        label += f" [runs of {lengths[0]}-{lengths[-1]} epochs]"
    return {
        "label": label,
        "grid": grid,
        "seeds": [run.config["seed"] for run in members],
        "runs": [run.name for run in members],
        "epochs": [len(run.history) for run in members],
        "best_acc": _spread([s["best_acc"] for s in summaries]),
        "final_acc": _spread([s["final_acc"] for s in summaries]),
        "target_epoch": {
            "values": reached,  # None where a seed never reached the target
            "mean": statistics.fmean(reached) if None not in reached else None,
        },
        "seconds_per_epoch": _spread([s["seconds_per_epoch"] for s in summaries]),
        "curve": {
            "epoch": list(range(1, common + 1)),
            "test_acc_mean": [statistics.fmean(accs) for accs in per_epoch],
            "test_acc_std": [_std(accs) for accs in per_epoch],
        },
    }


def _std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n-1), None for one value: no spread to measure."""
    return statistics.stdev(values) if len(values) > 1 else None


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"values": list(values), "mean": statistics.fmean(values), "std": _std(values)}


def sweep_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """The sweep table's header and one row of text cells per cell of the grid."""
    target = summary["target"]
    rows = [("cell", "seeds", "best test acc", "final test acc", f"{target:.0%} first reached",
             "s/epoch")]  # fmt: skip
    for cell in summary["cells"]:
        reached = cell["target_epoch"]
        epochs = ", ".join(str(e) if e else "never" for e in reached["values"])
        if reached["mean"] is not None and len(reached["values"]) > 1:
            epochs += f" (mean {reached['mean']:.1f})"
        rows.append(
            (cell["label"], ",".join(map(str, cell["seeds"])), _mean_std(cell["best_acc"]),
             _mean_std(cell["final_acc"]), f"epoch {epochs}" if any(reached["values"]) else
             "never", f"{cell['seconds_per_epoch']['mean']:.1f}")
        )  # fmt: skip
    return rows


def _mean_std(spread: dict[str, Any]) -> str:
    if spread["std"] is None:
        return f"{spread['mean']:.2%} (one seed)"
    return f"{spread['mean']:.2%} ± {100 * spread['std']:.2f}"


def sweep_table(summary: dict[str, Any]) -> str:
    """A sweep's summary as a plain-text table: accuracies as mean ± sample std in points."""
    return _aligned(sweep_rows(summary))
