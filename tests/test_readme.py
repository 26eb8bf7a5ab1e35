"""The README and the code cannot drift: its tables are generated from the code's config."""

from __future__ import annotations

from pathlib import Path

from eva_utils.config import HYPERPARAMETERS, get_preset, hyperparameter_table
from tools.readme import ABLATION, ablation_section

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_hyperparameter_table_is_the_session8_preset():
    assert hyperparameter_table(get_preset("session8"), HYPERPARAMETERS) in README


def test_readme_fast_table_is_the_fast_preset():
    assert hyperparameter_table(get_preset("fast"), HYPERPARAMETERS) in README


def test_session8_preset_is_the_assignment_recipe():
    c = get_preset("session8")
    assert (c.arch, c.norm, c.num_splits, c.dropout) == ("resnet18", "gbn", 2, 0.10)
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.016, 0.9, 5e-4, 128, 30)
    assert (c.schedule, c.step_size, c.gamma) == ("step", 2, 0.92)
    assert c.augment == ("crop", "flip", "rotate") and c.rotate_degrees == 8.0
    assert c.label_smoothing == 0.0 and not c.nesterov


def test_readme_ablation_section_is_generated_from_results_ablation():
    section = ablation_section(ROOT / ABLATION)
    assert (
        f"### Ablation: Ghost BatchNorm splits x dropout, three seeds each\n\n{section}\n\n"
        in README
    )
