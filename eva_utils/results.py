"""Recorded runs and how they compare: the README's results table, its captions and the
``compare`` figure, all generated from files.

A recorded run is a folder ``results/<name>/`` holding the run's ``metrics.json`` exactly as
training wrote it (a measured run is never edited) and ``provenance.json``: where, when and how
it was measured (hardware, commit, command). A *peer* run is not this project's: its folder
holds ``history.json`` (epoch, test_acc, test_loss, seconds per epoch) and a provenance that
describes the independent pipeline, for comparison rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis import REPORT_NAME, load_report
from .config import PRESETS, RECIPE_FIELDS, TARGET_ACCURACY, upgrade_config_dict
from .errors import ConfigError, RunFileError
from .files import read_json
from .plots import MAX_COMPARED, plot_comparison
from .runfolder import METRICS, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROVENANCE = "provenance.json"
PEER_HISTORY = "history.json"
# What the labels of compared runs always name; other recipe fields only where the runs differ.
NORM_FIELDS = ("norm", "num_splits", "dropout")
LABEL_FIELDS = (*RECIPE_FIELDS, "train_size", "test_size")
UNKNOWN_RECIPE, UNKNOWN_DATA = "unknown recipe", "unknown data"


@dataclass(frozen=True)
class RecordedRun:
    """One run's numbers (``metrics``: a metrics.json, or a peer's history) and provenance."""

    name: str
    metrics: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

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

    def summary(self) -> dict[str, Any]:
        return summarize_history(self.history)


def summarize_history(
    history: list[dict[str, Any]], target: float = TARGET_ACCURACY
) -> dict[str, Any]:
    """Best and final test accuracy, and the first epoch that reached ``target`` (None if never)."""
    best = max(history, key=lambda row: row["test_acc"])
    reached = next((row["epoch"] for row in history if row["test_acc"] >= target), None)
    return {
        "best_acc": best["test_acc"],
        "best_epoch": best["epoch"],
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
    return (
        f"{config.get('arch', '?')} {config.get('norm', '?')}, {len(metrics['history'])} epochs, "
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
    provenance = _read_provenance(folder / PROVENANCE)
    if provenance.get("peer") and not (folder / METRICS).exists():
        metrics = _read_peer_history(folder / PEER_HISTORY)
    elif (folder / METRICS).exists():
        metrics = read_metrics(folder / METRICS)
    else:
        raise RunFileError(
            f"{folder} holds no {METRICS}: give a run folder written by "
            "python -m eva_utils train (runs/NAME) or results/NAME"
        )
    return RecordedRun(folder.name, metrics, provenance)


def _read_provenance(path: Path) -> dict[str, Any]:
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
    runs = [read_recorded_run(path) for path in dict.fromkeys(folders)]
    return sorted(runs, key=lambda run: (run.provenance.get("order", len(runs)), run.name))


# --- the README's tables and captions ----------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def results_table(runs: Sequence[RecordedRun]) -> str:
    """A Markdown table of recorded runs: the README's results, generated so that its numbers
    are the files' numbers. Peers are marked as not this project."""
    rows = [
        "| run | data (train/test images) | epochs | best test acc (epoch) | final test acc "
        f"| {TARGET_ACCURACY:.0%} first reached | s/epoch | total (train + test) | hardware |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for run in runs:
        s = run.summary()
        source, sizes = describe_data(run.config)
        reached = target_reached(s)
        name = f"`{run.name}`" + (" (peer: not this project)" if run.peer else "")
        rows.append(
            f"| {name} | {source} ({sizes}) | {s['epochs']} | {s['best_acc']:.2%} "
            f"(epoch {s['best_epoch']}) | {s['final_acc']:.2%} | {reached} "
            f"| {s['seconds_per_epoch']:.1f} | {_minutes(s['seconds_per_epoch'] * s['epochs'])} "
            f"| {run.hardware} |"
        )
    return "\n".join(rows)


def provenance_list(runs: Sequence[RecordedRun]) -> str:
    """A Markdown list: how each run was measured (its command, or a peer's description)."""
    lines = []
    for run in runs:
        p = run.provenance
        how = f"`{p['command']}`" if "command" in p else p.get("description", "")
        where = ", ".join(
            part
            for part in (p.get("software"), p.get("commit") and f"commit {p['commit']}",
                         p.get("measured"))
            if part
        )  # fmt: skip
        note = f"; {p['note']}" if p.get("note") else ""
        lines.append(f"- `{run.name}`: {how} ({where}){note}.")
    return "\n".join(lines)


def history_caption(run: RecordedRun) -> str:
    """The README caption under a run's validation loss and accuracy graphs."""
    s = run.summary()
    source, sizes = describe_data(run.config)
    return (
        f"*Validation loss and accuracy of `results/{run.name}` ({run_label(run)}): "
        f"{s['epochs']} epochs on {source} (train/test images: {sizes}), {run.hardware}; best "
        f"{s['best_acc']:.2%} at epoch {s['best_epoch']}. Redraw with `make figures`.*"
    )


# --- comparing runs ----------------------------------------------------------------------------


def _norm_label(config: dict[str, Any]) -> str:
    norm = f"GBN {config.get('num_splits')} splits" if config.get("norm") == "gbn" else "BatchNorm"
    dropout = config.get("dropout") or 0
    return f"{norm}, " + (f"dropout {dropout:g}" if dropout else "no dropout")


def _preset_of(config: dict[str, Any]) -> str | None:
    """The preset whose recipe ``config`` follows, apart from its norm layer and dropout."""
    compared = [name for name in RECIPE_FIELDS if name not in (*NORM_FIELDS, "epochs")]
    for name, preset in PRESETS.items():
        if all(_same(config.get(key), getattr(preset, key)) for key in compared):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal, counting a JSON list and a Config tuple with the same items as equal."""
    sequences = (list, tuple)
    return list(a) == list(b) if isinstance(a, sequences) and isinstance(b, sequences) else a == b


def run_label(run: RecordedRun, others: Sequence[RecordedRun] = ()) -> str:
    """A label that says what sets ``run`` apart from ``others``: always its norm layer and
    dropout ("GBN 2 splits, dropout 0.1", "BatchNorm, no dropout"), then its preset where the
    runs follow different presets, else each other recipe field in which they differ."""
    if run.peer:
        return "peer: pytorch-cifar's own pipeline"
    if not run.config:  # a metrics.json without a config: say so rather than guess BatchNorm
        return UNKNOWN_RECIPE
    config, label = run.config, _norm_label(run.config)
    mine = [o for o in others if not o.peer and o.config]
    differing = [
        key
        for key in LABEL_FIELDS
        if key not in NORM_FIELDS
        and any(not _same(config.get(key), o.config.get(key)) for o in mine)
    ]
    if not differing:
        return label
    presets = {_preset_of(o.config) for o in mine} | {_preset_of(config)}
    if None not in presets and len(presets) > 1:
        return f"{_preset_of(config)}: {label}"
    shown = ", ".join(f"{key} {_show(config.get(key))}" for key in differing)
    return f"{label}, {shown}"


def _show(value: Any) -> str:
    if value is None:  # train_size, test_size: the whole set
        return "all"
    return "+".join(value) if isinstance(value, list | tuple) else f"{value}"


def comparison_labels(runs: Sequence[RecordedRun]) -> list[str]:
    """Labels for ``runs`` compared together; the run's name is added where two would match."""
    labels = [run_label(run, [o for o in runs if o is not run]) for run in runs]
    return [
        f"{label} ({run.name})" if labels.count(label) > 1 else label
        for run, label in zip(runs, labels)
    ]


def comparison_table(runs: Sequence[RecordedRun]) -> str:
    """A plain-text table of the compared runs: best, final, target epoch and s/epoch."""
    labels = comparison_labels(runs)
    header = ("run", "label", "best (epoch)", "final", f"{TARGET_ACCURACY:.0%} first", "s/epoch")
    rows = [header]
    for run, label in zip(runs, labels):
        s = run.summary()
        reached = target_reached(s)
        rows.append(
            (run.name, label, f"{s['best_acc']:.2%} ({s['best_epoch']})", f"{s['final_acc']:.2%}",
             reached, f"{s['seconds_per_epoch']:.1f}")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def comparison_caption(runs: Sequence[RecordedRun]) -> str:
    """A figure title naming the runs' data and hardware."""
    sources = {"{} (train/test images: {})".format(*describe_data(run.config)) for run in runs}
    hardware = {run.hardware for run in runs}
    return (
        f"{', '.join(run.name for run in runs)}\n"
        f"data: {'; '.join(sorted(sources))}; hardware: {'; '.join(sorted(hardware))}"
    )


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
    recorded = [run if isinstance(run, RecordedRun) else read_recorded_run(run) for run in runs]
    figure = plot_comparison(
        [run.history for run in recorded], comparison_labels(recorded),
        title or comparison_caption(recorded),
    )  # fmt: skip
    return figure, comparison_table(recorded)


def analysis_caption(run: RecordedRun, folder: str | Path) -> str:
    """The README caption under the analysis figures, from the run's ``analysis.json``."""
    report, _ = load_report(Path(folder) / REPORT_NAME)
    accuracy = report.accuracy.nan_to_num(2.0)
    weakest, strongest = int(accuracy.argmin()), int(report.accuracy.nan_to_num(-1.0).argmax())
    tested = int(report.matrix.sum())
    return (
        f"*The 32 most confident mistakes, the confusion matrix and the accuracy per class of "
        f"`{run.name}`'s best checkpoint (epoch {run.summary()['best_epoch']}), evaluated again "
        f"in fp32 by `analyze`: {report.overall_accuracy:.2%} on {tested:,} test images, "
        f"{len(report.mistakes):,} misclassified; weakest class {report.classes[weakest]} "
        f"({report.accuracy[weakest]:.2%}), strongest {report.classes[strongest]} "
        f"({report.accuracy[strongest]:.2%}).*"
    )
