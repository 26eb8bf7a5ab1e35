"""The README's generated parts: the results table and how each run was measured, the captions
under its figures, the ablation section and the platform table, each written from the files
they describe. ``python tools/readme.py`` prints them; tests check that the README holds them.

A maintainer's tool, not library API: it imports eva_utils, never the reverse.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eva_utils.analysis import REPORT_NAME, load_report
from eva_utils.config import TARGET_ACCURACY
from eva_utils.files import read_json
from eva_utils.precision import Hardware, decide
from eva_utils.results import (
    PROVENANCE,
    SWEEP_JSON,
    RecordedRun,
    describe_data,
    read_provenance,
    recorded_runs,
    run_label,
    sweep_rows,
    target_reached,
)

ROOT = Path(__file__).resolve().parents[1]


ABLATION = "results/ablation"  # the recorded ablation sweep: sweep.json, sweep.png, provenance


ABLATION_COMMAND = "make ablation DATA=path/to/cifar10-jpg.tar.gz"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def results_table(runs: Sequence[RecordedRun]) -> str:
    """A Markdown table of recorded runs: the README's results, generated so that its numbers
    are the files' numbers. Peers are marked as not this project."""
    rows = [
        "| run | data (train/test images) | epochs | final test acc | best test acc (epoch) "
        f"| {TARGET_ACCURACY:.0%} first reached | s/epoch | total (train + test) | hardware |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for run in runs:
        s = run.summary()
        source, sizes = describe_data(run.config)
        reached = target_reached(s)
        name = f"`{run.name}`" + (" (peer: not this project)" if run.peer else "")
        on_validation = "; chosen on validation" if s["best_on"] == "validation" else ""
        rows.append(
            f"| {name} | {source} ({sizes}) | {s['epochs']} | {s['final_acc']:.2%} "
            f"| {s['best_acc']:.2%} (epoch {s['best_epoch']}){on_validation} | {reached} "
            f"| {s['seconds_per_epoch']:.1f} | {_minutes(s['seconds_per_epoch'] * s['epochs'])} "
            f"| {run.hardware} |"
        )
    return "\n".join(rows)


def provenance_list(runs: Sequence[RecordedRun]) -> str:
    """A Markdown list: how each run was measured (its command, or a peer's description)."""
    lines = []
    for run in runs:
        p = run.provenance
        how, where = _how_and_where(p)
        note = f"; {p['note']}" if p.get("note") else ""
        lines.append(f"- `{run.name}`: {how} ({where}){note}.")
    return "\n".join(lines)


def _how_and_where(provenance: dict[str, Any], default: str = "") -> tuple[str, str]:
    """How a recording was made (its command, else its description) and where (software,
    commit, date), from its provenance."""
    p = provenance
    how = f"`{p['command']}`" if "command" in p else p.get("description", default)
    where = ", ".join(
        part
        for part in (p.get("software"), p.get("commit") and f"commit {p['commit']}",
                     p.get("measured"))
        if part
    )  # fmt: skip
    return how, where


def history_caption(run: RecordedRun) -> str:
    """The README caption under a run's validation loss and accuracy graphs."""
    s = run.summary()
    source, sizes = describe_data(run.config)
    return (
        f"*Validation loss and accuracy of `results/{run.name}` ({run_label(run)}): "
        f"{s['epochs']} epochs on {source} (train/test images: {sizes}), {run.hardware}; final "
        f"{s['final_acc']:.2%}, best {s['best_acc']:.2%} at epoch {s['best_epoch']} "
        f"({chosen_on(s)}). Redraw with `make figures`.*"
    )


def chosen_on(summary: dict[str, Any]) -> str:
    """What a run's best epoch was chosen on, said plainly for the README."""
    if summary["best_on"] == "validation":
        return f"chosen on the validation split, {summary['best_val_acc']:.2%} there"
    return "chosen on the test set itself, so optimistic"


def analysis_caption(run: RecordedRun, folder: str | Path) -> str:
    """The README caption under the analysis figures, from the run's ``analysis.json``."""
    report, _ = load_report(Path(folder) / REPORT_NAME)
    accuracy = report.accuracy.nan_to_num(2.0)
    weakest, strongest = int(accuracy.argmin()), int(report.accuracy.nan_to_num(-1.0).argmax())
    tested = int(report.matrix.sum())
    return (
        f"*The 32 most confident mistakes, the confusion matrix and the accuracy per class of "
        f"`{run.name}`'s best checkpoint (epoch {run.summary()['best_epoch']}, chosen on the "
        f"{run.summary()['best_on']} set), evaluated again "
        f"in fp32 by `analyze`: {report.overall_accuracy:.2%} on {tested:,} test images, "
        f"{len(report.mistakes):,} misclassified; weakest class {report.classes[weakest]} "
        f"({report.accuracy[weakest]:.2%}), strongest {report.classes[strongest]} "
        f"({report.accuracy[strongest]:.2%}).*"
    )


def sweep_markdown(summary: dict[str, Any]) -> str:
    """A sweep's summary as a Markdown table."""
    header, *rows = sweep_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


SPREAD_SENTENCE = (
    "The ± is the sample standard deviation over the seeds (n-1 in the denominator), in "
    "percentage points: how far the same recipe moves when only the seed (initial weights, data "
    "order, augmentation) changes. A gap between two cells smaller than about twice that spread "
    "is not evidence that one recipe beats the other."
)


def ablation_section(folder: str | Path = ABLATION) -> str:
    """The README's "Ablation" section, from ``folder``'s ``sweep.json`` and ``provenance.json``
    (how it was measured); without them, says the ablation has not been run on a GPU yet."""
    folder = Path(folder)
    if not (folder / SWEEP_JSON).is_file():
        return (
            "The ablation has not been run on a GPU yet, so there are no numbers here. It trains "
            "GBN with 1, 2, 4 and 8 splits, each with dropout 0 and 0.1, for seeds 1, 2 and 3 "
            f"(24 runs of the session8 recipe on all of the data): `{ABLATION_COMMAND}` writes "
            "`sweeps/ablation/` (or `benchmarks/gpu_suite.sh` as its last stage); copy its "
            f"`{SWEEP_JSON}` and `sweep.png` into `{ABLATION}/` with a `{PROVENANCE}` (hardware, "
            "commit, command, date) and this section shows them. " + SPREAD_SENTENCE
        )
    summary = read_json(folder / SWEEP_JSON, "run the sweep first")
    cells, seeds = summary["cells"], sorted({seed for c in summary["cells"] for seed in c["seeds"]})
    how, where = _how_and_where(read_provenance(folder / PROVENANCE), "the sweep")
    return "\n".join([
        f"{len(cells)} cells x seeds {', '.join(map(str, seeds))}, {max(cells[0]['epochs'])} "
        f"epochs on {summary['data']}, {'; '.join(summary['hardware'])}: {how} ({where}).",
        "",
        sweep_markdown(summary),
        "",
        f"![mean test accuracy per epoch of each cell]({ABLATION}/sweep.png)",
        "",
        SPREAD_SENTENCE,
    ])  # fmt: skip


# --- what runs where ---

# The platforms students train on, as the choice sees them: the README's "what runs where".
PLATFORMS: dict[str, Hardware] = {
    "NVIDIA H100 (compute capability 9.0)": Hardware("cuda", (9, 0)),
    "NVIDIA A100 (8.0)": Hardware("cuda", (8, 0)),
    "NVIDIA T4, Colab's free GPU (7.5)": Hardware("cuda", (7, 5)),
    "NVIDIA V100 (7.0)": Hardware("cuda", (7, 0)),
    "NVIDIA P100 (6.0)": Hardware("cuda", (6, 0)),
    "CPU with bf16 instructions (AVX512-BF16, AMX, Arm BF16)": Hardware("cpu", cpu_bf16=True),
    "CPU without them (AVX2; AVX-512 before Cooper Lake)": Hardware("cpu"),
    "Apple GPU (MPS)": Hardware("mps"),
}


def platform_table() -> str:
    """A Markdown table of what ``--precision auto`` (with channels_last on) picks on each of
    :data:`PLATFORMS`."""
    rows = ["| platform | computes in | gradient scaler | memory format |", "|---|---|---|---|"]
    for name, hardware in PLATFORMS.items():
        chosen = decide(hardware)
        memory_format = "channels_last" if chosen.channels_last else "NCHW"
        scaler = "yes" if chosen.scaler else "no"
        rows.append(f"| {name} | {chosen.name} | {scaler} | {memory_format} |")
    return "\n".join(rows)


def main() -> int:
    """Print every generated part of the README, from the files in this checkout."""
    runs = recorded_runs(ROOT / "results")
    run = next(run for run in runs if run.name == "session8-h100")
    parts = {
        "Results": results_table(runs) + "\n\n" + provenance_list(runs),
        "Caption": history_caption(run),
        "Analysis caption": analysis_caption(run, ROOT / "results" / run.name),
        "Ablation": ablation_section(ROOT / ABLATION),
        "What runs where": platform_table(),
    }
    for title, text in parts.items():
        print(f"## {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
