"""benchmarks/gpu_suite.sh --plan: the GPU suite's stages, estimates and caps, on any machine."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import ROOT, cli_env

SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
STAGES = ("0 setup", "1 tests marked cuda", "2 throughput.py --device cuda", "3 session8 + fast",
          "4 probe: 1, 2, 4, 8 runs at once", "5 ablation")  # fmt: skip


def test_plan_lists_every_stage_with_its_cap_and_touches_nothing(tmp_path):
    out = tmp_path / "suite"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--plan", "--out", str(out)], capture_output=True, text=True,
        env={**cli_env(), "PYTHON": sys.executable}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for stage in STAGES:
        line = next((line for line in lines if line.strip().startswith(stage)), None)
        assert line is not None and re.search(r"\d+ min( \(ABLATION_MINUTES\))?$", line), stage
    # The estimates come from the recorded H100 runs, and say so.
    assert "results/session8-h100: 7.2 s/epoch, results/fast-h100: 1.4 s/epoch" in result.stdout
    assert "stages 1-3 within 9 minutes" in result.stdout
    assert not out.exists()
