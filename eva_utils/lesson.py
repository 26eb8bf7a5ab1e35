"""What the main notebook does besides calling the library: it shows the library's own code,
redraws the curves after every epoch, trains on every GPU of the machine (one ``torchrun``
process each), and shows on a CPU that per-GPU BatchNorm is Ghost BatchNorm.

:func:`show_code` renders the source of the objects that run, read from the running modules,
so the notebook cannot show one loop and train with another. :func:`train` is ``fit`` on one
device and ``torchrun`` on two or more GPUs, so *Run all* trains once on any machine.
"""

from __future__ import annotations

import inspect
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from IPython.display import Markdown, display

from .config import Config, field_flags, get_preset
from .data import ImageSet
from .errors import EvaError
from .labels import ghost_batch_size
from .plots import plot_curves
from .runfolder import METRICS, read_metrics
from .training import fit

Row = dict[str, Any]


# --- the code that runs --------------------------------------------------------------------------


def source(obj: Callable | type) -> str:
    """The source of a class, function or method, as its module defines it (dedented)."""
    return textwrap.dedent(inspect.getsource(obj))


def show_code(*objects: Callable | type) -> Markdown:
    """The objects' source as one Python code block, each headed by the file it is read from."""
    parts = []
    for obj in objects:
        where = Path(inspect.getsourcefile(obj)).name
        parts.append(f"# {where}: {obj.__qualname__}\n{source(obj).rstrip()}")
    return Markdown("```python\n" + "\n\n\n".join(parts) + "\n```")


# --- curves redrawn after every epoch ------------------------------------------------------------


class LiveCurves:
    """An ``on_epoch`` callback for :func:`~eva_utils.training.fit`: after each epoch it redraws
    the loss and accuracy curves in one output of the cell (a display handle, updated in place),
    from the epochs the run already had (a resumed run) and the new ones."""

    def __init__(self, history: list[Row] | None = None) -> None:
        self.history = list(history or [])
        self.handle = None
        self.seen: int | None = None  # metrics.json's modification time when last read

    def __call__(self, row: Row) -> None:
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        self.show()

    def catch_up(self, folder: Path) -> None:
        """Redraw if ``folder``'s metrics.json holds epochs not drawn yet (another process's
        run). Called after each line that process prints: the file is read only when it was
        rewritten since the last look (once an epoch)."""
        metrics = folder / METRICS
        written = metrics.stat().st_mtime_ns if metrics.is_file() else None
        if written is None or written == self.seen:
            return
        self.seen, history = written, read_metrics(metrics)["history"]
        if len(history) > len(self.history):
            self.history = history
            self.show()

    def show(self) -> None:
        if not self.history:
            return
        figure = plot_curves(self.history)
        if self.handle is None:
            self.handle = display(figure, display_id=True)
        else:
            self.handle.update(figure)


def live_curves(folder: str | Path) -> LiveCurves:
    """Curves for a run into ``folder``: they start from the epochs its metrics.json holds."""
    metrics = Path(folder) / METRICS
    return LiveCurves(read_metrics(metrics)["history"] if metrics.is_file() else None)


# --- one run on every GPU ------------------------------------------------------------------------


def gpus_here() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ranks_config(config: Config, gpus: int) -> Config:
    """``config`` for ``gpus`` processes: the same global batch, and Ghost BatchNorm's splits
    divided among them where they divide (each GPU's BatchNorm already normalises its own
    slice of the batch), so that the run normalises over the same ghost batches as one GPU."""
    if gpus > 1 and config.norm == "gbn" and config.num_splits % gpus == 0:
        return config.replace(num_splits=config.num_splits // gpus)
    return config


def ranks_label(config: Config, gpus: int) -> str:
    """What a run of ``config`` on ``gpus`` processes is, in BatchNorm's terms."""
    per_gpu = ranks_config(config, gpus).to_dict()
    norm = "BatchNorm" if ghost_batch_size(per_gpu) == config.batch_size else "Ghost BatchNorm"
    return (
        f"{gpus} GPUs x {norm} = ghost batches of {ghost_batch_size(per_gpu, gpus)} images "
        f"(batch {config.batch_size}, one GPU's run: ghost batches of "
        f"{ghost_batch_size(config.to_dict())})"
    )


def torchrun_args(config: Config, gpus: int, out: str | Path) -> list[str]:
    """torchrun's arguments for training ``config``'s recipe on ``gpus`` processes into ``out``."""
    config, preset = ranks_config(config, gpus), get_preset("session8")
    # every field the recipe changes, but the device: each process takes its own GPU
    changed = [name for name, value in config.items()
               if name != "device" and value != getattr(preset, name)]  # fmt: skip
    return ["--standalone", f"--nproc-per-node={gpus}", "-m", "eva_utils", "train",
            "--out", str(out), *field_flags(config, changed)]  # fmt: skip


def torchrun_command(config: Config, gpus: int, out: str | Path) -> str:
    """The shell command that trains ``config``'s recipe on ``gpus`` GPUs of this machine."""
    return shlex.join(["torchrun", *torchrun_args(config, gpus, out)])


def ranks_folder(run_dir: str | Path, gpus: int) -> Path:
    """Where a run on ``gpus`` processes trains: beside the one-GPU run of the same recipe."""
    return Path(f"{run_dir}-{gpus}gpus")


def multi_gpu_note(config: Config, run_dir: str | Path, gpus: int | None = None) -> str:
    """What the training cell did about this machine's GPUs, and the command for two."""
    gpus = gpus_here() if gpus is None else gpus
    if gpus > 1 and config.device in ("auto", "cuda"):
        folder = ranks_folder(run_dir, gpus)
        return f"{gpus} GPUs here: the training cell trained on all of them into {folder}"
    here = {0: "No GPU", 1: "One GPU"}.get(gpus, f"{gpus} GPUs, but device={config.device!r}")
    command = torchrun_command(config, 2, ranks_folder(run_dir, 2))
    return (
        f"{here} here: the training cell trained in one process. On 2 GPUs it runs\n{command}\n"
        f"that is, {ranks_label(config, 2)}"
    )


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    gpus: int | None = None,
) -> list[Row]:
    """Train ``config`` once, with live curves: ``fit`` into ``run_dir`` on one device, or, with
    two or more GPUs (``gpus``, default: this machine's), one torchrun process per GPU into
    :func:`ranks_folder`. Returns the run's history."""
    if gpus is None:  # a run on the CPU stays one process, whatever the machine has
        gpus = gpus_here() if config.device in ("auto", "cuda") else 1
    if gpus < 2:
        curves = live_curves(run_dir) if resume else LiveCurves()
        return fit(config, out=run_dir, resume=resume, datasets=datasets, on_epoch=curves)
    folder = ranks_folder(run_dir, gpus)
    print(f"{ranks_label(config, gpus)}\n{torchrun_command(config, gpus, folder)}")
    resumed = ["--resume", str(folder)] if (folder / METRICS).is_file() else []
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(config, gpus, folder)]
    curves = live_curves(folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([*command, *resumed], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env) as run:  # fmt: skip
        for line in run.stdout:  # the main rank's output, and the curves after each epoch
            print(line, end="")
            curves.catch_up(folder)
    if run.returncode != 0:
        raise EvaError(f"training on {gpus} GPUs stopped (exit code {run.returncode}): see above")
    curves.catch_up(folder)
    return curves.history


# --- per-GPU BatchNorm is Ghost BatchNorm, on a CPU --------------------------------------------

# The demo's three runs: what each is, and its arguments to python ("{folder}": the output folder).
DEMO_RUNS = (
    ("2 processes with BatchNorm (torchrun)",
     ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
      "-m", "eva_utils.demo_ranks", "{folder}"]),
    ("1 process with Ghost BatchNorm", ["-m", "eva_utils.demo_ranks", "{folder}", "--norm", "gbn"]),
    ("1 process with BatchNorm",
     ["-m", "eva_utils.demo_ranks", "{folder}", "--norm", "bn", "--name", "one-process"]),
)  # fmt: skip
# Seconds for each run, and for a rank waiting on the other: a few seconds' work, but on a
# loaded machine (a test suite beside it, a busy Colab CPU) importing torch and eva_utils took
# 16 s (load 7 on 2 cores), and one rank may get there long before the other.
DEMO_TIMEOUT, DEMO_PEER_TIMEOUT = 600, 180


def ranks_and_ghost_batches() -> dict[str, float]:
    """Train the small network of :mod:`eva_utils.demo_ranks` on two CPU processes with
    BatchNorm, in one process with Ghost BatchNorm of 2 splits, and in one process with plain
    BatchNorm; returns the largest difference of the first from each of the others ("ghost",
    "plain"), weights and running statistics included. A run that fails raises an
    :class:`EvaError` naming the run and its last words."""
    from .demo_ranks import compare

    env = {**os.environ, "OMP_NUM_THREADS": "1", "EVA_DIST_TIMEOUT": str(DEMO_PEER_TIMEOUT)}
    with tempfile.TemporaryDirectory() as folder:
        for what, args in DEMO_RUNS:
            command = [sys.executable, *(arg.format(folder=folder) for arg in args)]
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True,
                                      timeout=DEMO_TIMEOUT)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise EvaError(
                    f"the two-process demo failed: {what} did not finish in {DEMO_TIMEOUT} s"
                ) from None
            if done.returncode != 0:
                raise EvaError(
                    f"the two-process demo failed: {what} exited with code {done.returncode} "
                    f"({_last_words(done.stderr)})"
                )
        ranks = Path(folder) / "bn.pt"
        return {
            "ghost": compare(ranks, Path(folder) / "gbn.pt"),
            "plain": compare(ranks, Path(folder) / "one-process.pt"),
        }


_EXCEPTION = re.compile(r"(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b")


def _last_words(stderr: str) -> str:
    """The line of a failed process's ``stderr`` that says why: its last eva8 line or Python
    exception (a rank's, not torchrun's ChildFailedError and banner after it), else its last
    line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip().strip("=-")]
    said = [line for line in lines if line.startswith("eva8")
            or (_EXCEPTION.match(line) and "ChildFailedError" not in line)]  # fmt: skip
    return (said or lines or ["no output"])[-1]
