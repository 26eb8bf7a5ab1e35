"""The rebuilt house trains what the old one trained: a few CPU epochs with a fixed seed give
exactly the history (every loss, accuracy and learning rate, to the last bit) that the code
before the rebuild gives, read from git and run in a process of its own on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The last commit before the training step, state, loop and seam for ranks were split apart.
BEFORE = "baad961"
RECIPES = {
    # GBN 2 splits and dropout, StepLR stepped per epoch, every augmentation
    "session8": dict(epochs=3, step_size=1),
    # BatchNorm, OneCycleLR stepped per batch, label smoothing, Nesterov, flip TTA
    "fast": dict(epochs=2, lr=0.1),
}
# Two batches an epoch: enough for every per-batch and per-epoch step to count.
SMALL = dict(
    data="synthetic", train_size=32, test_size=16, batch_size=16, device="cpu",
    precision="fp32", seed=3,
)  # fmt: skip
RUN = """
import json, sys
from eva_utils import fit, get_preset
config = get_preset(sys.argv[1]).replace(**json.loads(sys.argv[2]))
print(json.dumps(fit(config, progress=False)))
"""


def _old_package(folder: Path) -> Path:
    """``eva_utils`` as it was at :data:`BEFORE`, extracted into ``folder``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git history of eva8 (this is not a git checkout)")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE, "eva_utils"], capture_output=True, timeout=60
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone's history (a shallow clone?)")
    (folder / "old.tar").write_bytes(archive.stdout)
    with tarfile.open(folder / "old.tar") as tar:
        tar.extractall(folder, filter="data")
    return folder


def _history(package_root: Path, preset: str, changes: dict) -> list[dict]:
    """The history ``fit`` returns, run by the ``eva_utils`` under ``package_root`` in a fresh
    one-thread process (the same kernels for both codes)."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUN, preset, json.dumps(changes)],
        cwd=package_root, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [
        # the numbers: not the time, nor the precision label that the code before did not record
        {key: value for key, value in row.items() if key not in ("seconds", "precision")}
        for row in json.loads(done.stdout.strip().splitlines()[-1])
    ]


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_history_equals_the_one_the_code_before_the_rebuild_records(preset, tmp_path):
    changes = {**SMALL, **RECIPES[preset]}
    before = _history(_old_package(tmp_path), preset, changes)
    now = _history(ROOT, preset, changes)
    assert len(now) == RECIPES[preset]["epochs"]
    assert now == before  # equal, not close: the same numbers to the last bit
