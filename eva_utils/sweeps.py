"""Seeded ablations: every cell of a grid of recipe fields, trained for several seeds.

Each cell x seed is an ordinary run folder under the sweep's folder, named from its recipe
(:func:`~eva_utils.config.recipe_name`) and written by :func:`~eva_utils.training.fit`, so
``plot``, ``compare`` and ``analyze`` work on each. Running the same sweep again continues it:
finished runs are skipped, interrupted ones resumed, and a changed grid or recipe adds runs in
new folders. ``sweep.json`` and ``sweep.png`` summarise the runs (:func:`write_summary`).
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import GRID_FIELDS, Config, field_flags, parse_field, recipe_name
from .data import check_out_of_data
from .errors import (
    ConfigError,
    EvaError,
    Interrupted,
    RunFileError,
    TrainingDiverged,
    option,
    spelled,
)
from .files import atomic_write_json, check_output_folder, open_in_folder, read_json
from .plots import plot_sweep, save_figure
from .progress import tqdm
from .ranks import Ranks
from .results import SWEEP_JSON, summarize_sweep
from .runfolder import epochs_done, holds_run
from .signals import ends_with_this_process, raise_if_stop_requested
from .training import fit

SWEEP_PNG = "sweep.png"
# The runs a sweep planned (every --shard's), as :func:`record_plan` writes them: the summary
# says which of them hold no epoch and which runs under the folder are not planned.
SWEEP_PLAN, PLAN_FORMAT = "sweep-plan.json", "eva8-sweep-plan"
LOGS = "logs"  # the sweep folder's logs/<run>.log: the output of each run trained in a subprocess
MAX_RUNS = 1000  # a sweep's cells x seeds: more is a typo (100^4), not a plan for one machine
POLL_SECONDS = 0.5  # how often the parallel runs' progress and exits are looked at
Grid = Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class PlannedRun:
    """One cell x seed of a sweep: its recipe, its run folder and the epochs it holds."""

    config: Config
    folder: Path
    epochs_done: int

    @property
    def complete(self) -> bool:
        return self.epochs_done >= self.config.epochs


def refuse_ranks() -> None:
    """Refuse a sweep started by torchrun on several processes: each would train the whole
    plan, and its runs, started with the ranks' variables, would pair up across processes."""
    if Ranks.from_environment().distributed:
        raise ConfigError(
            "a sweep starts its own processes (--parallel N), so torchrun cannot start it: run "
            "python -m eva_utils sweep ... in one process (torchrun ... train trains one run "
            "on several processes)"
        )


def check_grid_field(name: str) -> None:
    """Refuse a grid over ``name`` unless it is a recipe field (one line, naming the fields)."""
    fields = [name for name, _ in Config().items()]
    if name == "seed":
        raise ConfigError("give the seeds with --seeds 1,2,3, not --grid seed=...")
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--grid {name}: unknown field{hint}; grid fields: {_listed()}")
    if name not in GRID_FIELDS:
        raise ConfigError(
            f"--grid {name}: not a recipe field (it does not change what is trained, so its "
            f"runs would share a folder); grid fields: {_listed()}"
        )


def _listed() -> str:
    return ", ".join(GRID_FIELDS)


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["num_splits=1,2", "dropout=0,0.1"]`` as ``{"num_splits": [1, 2], ...}``. A value of
    ``augment`` joins its parts with ``+`` (``augment=crop+flip,crop``)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, equals, text = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not equals:
            raise ConfigError(f"--grid {spec!r}: give FIELD=V1,V2,..., e.g. num_splits=1,2,4,8")
        check_grid_field(name)
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice: give all its values in one")
        values = [part.strip() for part in text.split(",") if part.strip()]
        if not values:
            raise ConfigError(f"--grid {name}= has no values: give FIELD=V1,V2,...")
        grid[name] = [
            parse_field(name, value.replace("+", ","), source=f"--grid {name}") for value in values
        ]
        check_distinct(name, grid[name], f"--grid {spec}")
    return grid


def check_distinct(name: str, values: Sequence[Any], given: str) -> None:
    """Refuse a grid whose values of ``name`` repeat (``0`` and ``0.0`` are one value): both
    cells would train one folder at once."""
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ConfigError(
                f"{given}: {name} {value!r} is given twice (the runs would share a folder); give "
                "each value once"
            )


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` as ``[1, 2, 3]``; anything but distinct whole numbers is a ConfigError."""
    parts = [part.strip() for part in text.split(",")]
    seeds = [parse_field("seed", part, source="--seeds") for part in parts]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {text}: a seed is given twice")
    return seeds


def plan(config: Config, grid: Grid, seeds: Sequence[int], out: str | Path) -> list[PlannedRun]:
    """Every cell x seed of the sweep: ``config`` with the cell's grid values and the seed, in
    ``out/<recipe name>``, with the epochs that folder holds already. Every recipe, and that
    ``out`` can be written, is checked before anything trains."""
    refuse_ranks()
    for name, values in grid.items():
        check_grid_field(name)
        check_distinct(name, list(values), f"the grid's {name}")
    if not seeds:
        raise ConfigError("a sweep needs at least one seed")
    check_out_of_data(out, config.data)
    count = math.prod(len(values) for values in grid.values()) * len(seeds)
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(values)) for values in [*grid.values(), seeds])
        raise ConfigError(
            f"the sweep has {count:,} runs ({sizes} values x seeds), more than the {MAX_RUNS:,} "
            "one sweep may plan: give fewer values, or split it into several sweeps"
        )
    check_output_folder(out)
    runs, cells = [], {}
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        shown = ", ".join(  # as --grid spells them: augment=crop+flip
            f"{name}={'+'.join(value) if isinstance(value, tuple) else value}"
            for name, value in cell.items()
        )
        for seed in seeds:
            try:
                run_config = config.replace(**cell, seed=seed)
            except ConfigError as error:
                raise ConfigError(f"the grid cell {shown}: {error}") from None
            folder = _run_folder(Path(out), run_config)
            # BatchNorm has no ghost batches: num_splits changes nothing it trains
            ignored = run_config.norm == "bn" and "num_splits" in cell
            trains = recipe_name(run_config.replace(num_splits=1) if ignored else run_config)
            if cells.setdefault(trains, shown) != shown:
                why = f"{option('norm', 'bn')} ignores {option('num_splits')}"
                raise ConfigError(
                    f"the grid cells {cells[trains]} and {shown} are one recipe "
                    f"({why if ignored else folder.name}): give values that train different runs"
                )
            runs.append(PlannedRun(run_config, folder, epochs_done(folder)))
    return runs


def record_plan(runs: Sequence[PlannedRun], out: str | Path) -> None:
    """Write ``out/sweep-plan.json``: the run folders of the whole plan (every shard's), so that
    a summary can name the planned runs it lacks and the runs it holds that are not planned.
    A sweep with a changed grid records its own plan in place of the last one."""
    Path(out).mkdir(parents=True, exist_ok=True)
    names = [run.folder.name for run in runs]
    atomic_write_json({"format": PLAN_FORMAT, "runs": names}, Path(out) / SWEEP_PLAN)


def _run_folder(out: Path, config: Config) -> Path:
    """``out/<recipe name>``; a run that an earlier version started under the name its data
    path's text gave (:func:`~eva_utils.config.recipe_name`) keeps that folder."""
    folder = out / recipe_name(config)
    if not folder.exists() and config.data is not None:
        typed = out / recipe_name(config, data_as_typed=True)
        if typed.is_dir():
            return typed
    return folder


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` as (2, 4): the second of four parts of a sweep's plan."""
    index, slash, parts = text.partition("/")
    if slash and index.strip().isdecimal() and parts.strip().isdecimal():  # "²".isdigit()
        index, parts = int(index), int(parts)
        if 1 <= index <= parts:
            return index, parts
    raise ConfigError(
        f"--shard {text}: give I/N with 1 <= I <= N, e.g. --shard 1/4 for the first of four parts "
        "(a job array's task: --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT)"
    )


def shard(runs: Sequence[PlannedRun], index: int, parts: int) -> list[PlannedRun]:
    """Part ``index`` of ``parts`` of a plan: every ``parts``-th run from the ``index``-th, so
    that the parts together are the plan, each run in one part (the plan's order is the same
    on every machine: the grid's values and seeds in the order given)."""
    return list(runs[index - 1 :: parts])


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def train_planned(
    runs: Sequence[PlannedRun], *, parallel: int = 1, progress: bool = True, again: str = ""
) -> list[tuple[PlannedRun, str]]:
    """Train the runs that are not complete, ``parallel`` at a time (1: in this process, else as
    ``python -m eva_utils train --quiet`` subprocesses logging to ``logs/<run>.log``), behind one
    bar counting epochs. Returns the runs that failed (diverged, or locked by another trainer)
    with why; Ctrl-C stops all of them, each keeping its last finished epoch, and raises
    Interrupted saying to continue with ``again`` (the sweep's command)."""
    todo = [run for run in runs if not run.complete]
    bar = tqdm(
        total=sum(run.config.epochs for run in todo), initial=sum(r.epochs_done for r in todo),
        desc=f"sweep ({len(todo)} runs)", unit="epoch", disable=not progress or not todo,
    )  # fmt: skip
    try:
        if parallel == 1:
            return _train_here(todo, bar)
        return _train_in_subprocesses(todo, parallel, bar)
    except (Interrupted, KeyboardInterrupt):
        complete = sum(epochs_done(run.folder) >= run.config.epochs for run in runs)
        raise Interrupted(
            f"sweep stopped: {complete} of {len(runs)} runs complete, the others keep their last "
            f"finished epoch; continue with: {again or 'the same sweep again'}"
        ) from None
    finally:
        bar.close()


def _train_here(todo: Sequence[PlannedRun], bar: Any) -> list[tuple[PlannedRun, str]]:
    failed = []
    for run in todo:
        bar.set_postfix_str(run.folder.name)
        try:
            fit(run.config, out=run.folder, resume=holds_run(run.folder), progress=False,
                on_epoch=lambda row: bar.update())  # fmt: skip
        except (TrainingDiverged, RunFileError) as error:  # the other runs can still train
            failed.append((run, str(error)))
    return failed


def _train_in_subprocesses(
    todo: Sequence[PlannedRun], parallel: int, bar: Any
) -> list[tuple[PlannedRun, str]]:
    waiting, running, failed = list(todo), {}, []
    gpus, placed = visible_gpus(), {}  # process -> the GPU it sees
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                run = waiting.pop(0)
                gpu = None
                if gpus and run.config.device in ("auto", "cuda"):  # the least busy GPU
                    gpu = min(gpus, key=lambda g: list(placed.values()).count(g))
                process = _start(run, gpu)
                running[process], placed[process] = [run, run.epochs_done], gpu
            time.sleep(POLL_SECONDS)
            raise_if_stop_requested()
            for process, (run, counted) in list(running.items()):
                exited = process.poll() is not None
                epochs = epochs_done(run.folder)
                bar.update(epochs - counted)
                running[process][1] = epochs
                if exited:
                    del running[process], placed[process]
                    if process.returncode != 0:
                        failed.append((run, _why_it_failed(process, run)))
            bar.set_postfix_str(f"{len(running)} running")
    except KeyboardInterrupt:
        for process in running:  # each saves its last finished epoch, then exits
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    return failed


def _log(run: PlannedRun) -> Path:
    return run.folder.parent / LOGS / f"{run.folder.name}.log"


def _start(run: PlannedRun, gpu: str | None = None) -> subprocess.Popen:
    """``python -m eva_utils train`` for ``run`` (resuming what its folder holds), its output
    appended to its log, seeing only ``gpu`` if one is given. A session of its own: Ctrl-C
    reaches the sweep, which stops it; and it ends when the sweep ends, whatever ends the sweep
    (``ends_with_this_process``)."""
    where = ["--resume", str(run.folder)] if holds_run(run.folder) else ["--out", str(run.folder)]
    command = [sys.executable, "-m", "eva_utils", "train", "--quiet", *where,
               *field_flags(run.config)]  # fmt: skip
    log = _log(run)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else None
    # appended to (a resumed run's output follows its earlier one's), never through a link
    with os.fdopen(open_in_folder(log, os.O_WRONLY | os.O_APPEND), "a") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=ends_with_this_process())  # fmt: skip


def _why_it_failed(process: subprocess.Popen, run: PlannedRun) -> str:
    """The signal that killed a child (SIGKILL: most often the system out of memory), else
    the last line it wrote to its log."""
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        oom = " (most often: the machine ran out of memory)" if name == "SIGKILL" else ""
        return f"killed by signal {name}{oom}; its log: {_log(run)}"
    log = _log(run)
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else f"exit status {process.returncode}, no output"


def planned_runs(out: str | Path) -> list[str] | None:
    """The run folders ``out/sweep-plan.json`` names, or None where no plan was recorded."""
    path = Path(out) / SWEEP_PLAN
    if not path.exists():
        return None
    plan = read_json(path, "")
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not all(isinstance(name, str) for name in runs):
        raise RunFileError(f"{path} holds no list of runs: delete it, then rerun the sweep")
    return runs


def write_summary(out: str | Path) -> dict[str, Any]:
    """Summarise the runs under ``out`` into ``out/sweep.json`` and draw ``out/sweep.png``;
    returns the summary (:func:`~eva_utils.results.summarize_sweep`), with the runs of the
    recorded plan: those that hold no epoch yet (``missing``: a --shard not trained) and the
    runs summarised that it does not name (``foreign``)."""
    refuse_ranks()  # every rank would write the files
    out = Path(out)
    check_output_folder(out, spelled("--summarize", "out=..."))  # sweep.json, sweep.png go there
    summary = summarize_sweep(out)
    planned = planned_runs(out)
    found = [name for cell in summary["cells"] for name in cell["runs"]]
    summary.update(
        planned=planned,
        missing=[] if planned is None else sorted(set(planned) - set(found)),
        foreign=[] if planned is None else [name for name in found if name not in planned],
    )
    atomic_write_json(summary, out / SWEEP_JSON)
    title = f"{out.name}: {summary['data']}; {'; '.join(summary['hardware'])}"
    save_figure(plot_sweep(summary["cells"], title), out / SWEEP_PNG)
    return summary


def summary_notes(summary: dict[str, Any], out: Path) -> list[str]:
    """The lines that follow a summary's table: the runs it skipped and why, the planned runs
    it lacks and the runs it holds that are not planned (:func:`write_summary`)."""
    notes = [f"skipped {out / skipped['run']}: {skipped['why']}" for skipped in summary["skipped"]]
    if summary["missing"]:
        notes.append(
            f"missing {len(summary['missing'])} of the {len(summary['planned'])} planned runs "
            f"(first: {out / summary['missing'][0]}), which hold no epoch yet: train them with "
            "the sweep's command (every --shard of it)"
        )
    if summary["foreign"]:
        notes.append(
            f"{len(summary['foreign'])} runs summarised are not in the plan recorded in "
            f"{out / SWEEP_PLAN} (first: {out / summary['foreign'][0]}): runs of another grid "
            "or sweep"
        )
    return notes


def sweep(
    config: Config,
    grid: Grid,
    seeds: Sequence[int] = (1,),
    *,
    out: str | Path,
    parallel: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` with every combination of the ``grid``'s values (``{"num_splits": [1,
    2], "dropout": [0.0, 0.1]}``) for each seed, into run folders under ``out``, and return the
    summary also written to ``out/sweep.json`` and drawn in ``out/sweep.png``. Calling it again
    continues: complete runs are skipped, interrupted ones resumed."""
    runs = plan(config, grid, seeds, out)
    record_plan(runs, out)
    failed = train_planned(runs, parallel=parallel, progress=progress)
    try:
        summary = write_summary(out)
    except RunFileError:
        if failed:  # no run saved an epoch: the failure is the news, not the empty summary
            raise failure(failed, len(runs), summarised=False) from None
        raise
    if failed:
        raise failure(failed, len(runs))
    return summary


def failure(
    failed: Sequence[tuple[PlannedRun, str]], total: int, summarised: bool = True
) -> EvaError:
    """One line for the runs that failed: how many, and the first one's reason."""
    run, why = failed[0]
    summary = "the others are summarised" if summarised else "no run saved an epoch to summarise"
    return EvaError(
        f"{len(failed)} of {total} runs failed; {run.folder}: {why} ({summary}; rerun the sweep "
        "to retry them)"
    )
