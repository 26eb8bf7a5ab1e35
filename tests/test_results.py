"""Recorded runs in results/: well-formed, and the README's results table is generated from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from eva_utils.analysis import recorded_results, results_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = recorded_results(ROOT / "results")


def test_there_is_a_recorded_real_run():
    assert RESULTS, "results/ holds no run: the README graphs would have no source"


def test_readme_results_table_is_generated_from_results():
    assert results_table(RESULTS) in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_recorded_run_is_complete_and_real(name):
    metrics = RESULTS[name]
    history = metrics["history"]
    assert [row["epoch"] for row in history] == list(range(1, metrics["config"]["epochs"] + 1))
    assert metrics["config"]["data"] not in (None, "synthetic")  # real CIFAR-10
    assert metrics["environment"]["device_name"]
    assert all(0 <= row["test_acc"] <= 1 for row in history)
    assert (ROOT / "results" / name / "analysis.json").is_file()


def test_results_hold_no_checkpoints_or_images():
    files = [p for p in (ROOT / "results").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".md"}
