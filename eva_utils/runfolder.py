"""Run folders: the files a training run writes, how they are read and checked, and when a run
may be resumed.

A run folder holds ``last.pt`` (a training run's whole state,
:meth:`~eva_utils.state.TrainingState.state_dict`: enough to resume exactly), ``best.pt`` (the
best epoch's weights, config and classes) and ``metrics.json`` (config, environment and
history). This module only writes, reads and checks these files; what goes into them comes from
the objects that own it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import RECIPE_FIELDS, Config, same_data
from .errors import (
    CheckpointError,
    RecipeChanged,
    RunFileError,
    option,
    quoted,
    resume_command,
    spelled,
    train_command,
)
from .files import (
    atomic_write,
    atomic_write_json,
    check_output_folder,
    open_folder,
    read_json,
    remove_dead_scratch,
    same_file,
)
from .locks import hold, release
from .signals import signals_deferred

FORMAT = "eva8-checkpoint"
METRICS_FORMAT = "eva8-metrics"
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.json"
LOCK = ".lock"  # held by the one process that trains in the folder; removed when it stops
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
BEST_KEYS = ("config", "classes", "model", "epoch", "test_acc")  # what best.pt holds
VAL_KEYS = ("val_loss", "val_acc")  # in each row of a run with a validation split
# What the best epoch was chosen on, by the accuracy that chose it (metrics.json's "best_on").
BEST_ON = {"val_acc": "validation", "test_acc": "test"}


def best_key(history: Sequence[dict[str, Any]]) -> str:
    """The accuracy that chooses the best epoch: ``val_acc`` where every row has one (a run
    with a validation split), else ``test_acc`` (the test set itself chooses: optimistic)."""
    return "val_acc" if history and all("val_acc" in row for row in history) else "test_acc"


def best_row(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best epoch's row: the first with the highest :func:`best_key` accuracy."""
    return max(history, key=lambda row: row[best_key(history)])


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` of ``state``, marked as an eva8 checkpoint, never leaving a partial file.
    A write that stops short (a full disk) raises OSError, as any other failed write does."""

    def write(file: Any) -> None:
        try:
            torch.save({"format": FORMAT, **state}, file)
        except RuntimeError:  # torch's zip writer turns ENOSPC into "unexpected pos ..."
            raise OSError(errno.ENOSPC, SHORT_WRITE) from None

    atomic_write(path, write)


SHORT_WRITE = "the write stopped short: the disk is full or a file-size limit was reached"
MB = 2**20


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in ``value`` (nested dicts, lists, tuples): about the size of
    its checkpoint."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _space_needed(folder: Path, state: dict[str, Any]) -> str:
    """``, which needs about N MB free (M MB are)``: the room for an epoch's checkpoints."""
    needed = _tensor_bytes(state) + _tensor_bytes(state["model"])  # last.pt and best.pt
    try:
        free = f"{shutil.disk_usage(folder).free / MB:,.0f} MB are"
    except OSError:
        free = "the free space is unknown"
    return f"; an epoch's checkpoints need about {needed / MB:,.0f} MB free there ({free})"


def load_checkpoint(path: str | Path, needs: Sequence[str] = ()) -> dict[str, Any]:
    """Read an eva8 checkpoint (weights only: nothing in it is executed) that holds the keys
    ``needs``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first, or check the run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises many kinds
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({error.__class__.__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eva8 checkpoint")
    missing = [key for key in needs if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} has no {' or '.join(missing)}: it is not a {path.name} that "
            "python -m eva_utils train wrote; train the run again"
        )
    return state


def check_classes(path: str | Path, saved: Sequence[str], classes: Sequence[str], fix: str) -> None:
    """Refuse data whose class names differ from those ``path`` was trained on, order included:
    the model's outputs are the classes in that order. ``fix`` says what to do instead."""
    if list(saved) != list(classes):
        raise CheckpointError(
            f"{path} was trained on the classes {list(saved)}, the data has {list(classes)}: {fix}"
        )


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path | str) -> None:
    """Load a checkpoint's weights, with a one-line error if the architecture differs."""
    check_weights(model.state_dict(), state, path)
    model.load_state_dict(state["model"])


def check_weights(expected: dict[str, Any], state: dict[str, Any], path: Path | str) -> None:
    """Refuse a checkpoint whose weights are not the tensors ``expected`` (a model's
    ``state_dict()``: on the meta device, only their shapes) in one line."""
    given = state["model"]
    unexpected = [name for name in given if name not in expected]
    missing = [name for name in expected if name not in given]
    reshaped = [
        name for name in expected if name in given and expected[name].shape != given[name].shape
    ]
    if unexpected or missing or reshaped:
        first = (unexpected or missing or reshaped)[0]
        raise CheckpointError(
            f"{path} holds weights of another architecture than this model "
            f"({len(unexpected)} unexpected, {len(missing)} missing and {len(reshaped)} "
            f"differently shaped tensors, e.g. {first}); its config says "
            f"{state['config'].get('arch')} with {len(state['classes']):,} classes"
        )


# --- metrics.json ------------------------------------------------------------------------------


def write_metrics(path: Path, config: Config, history: list[dict], env: dict[str, str]) -> None:
    atomic_write_json(
        {"format": METRICS_FORMAT, "config": config.to_dict(), "environment": env,
         "best_on": BEST_ON[best_key(history)], "history": history},
        path,
    )  # fmt: skip


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and check a metrics.json written by eva8: a ``history`` of epochs 1, 2, ... with
    finite numbers and accuracies that are fractions in [0, 1], a ``config`` object (or none)
    and an ``environment`` object. Raises RunFileError, in one line, naming what is wrong."""
    path = Path(path)
    metrics = read_json(path, "give the metrics.json of a run")
    written = metrics.get("format", METRICS_FORMAT) if isinstance(metrics, dict) else None
    if written not in (METRICS_FORMAT, None):  # None: not an object, said below
        raise RunFileError(
            f"{path} is of the format {written!r}, not {METRICS_FORMAT!r}: give the metrics.json "
            "of a run that this version of eva8 trained (a newer one's: update eva8)"
        )
    history = metrics.get("history") if isinstance(metrics, dict) else None
    if (
        not isinstance(history, list)
        or not history
        or not all(isinstance(row, dict) and set(HISTORY_KEYS) <= row.keys() for row in history)
    ):
        raise RunFileError(
            f"{path} is not an eva8 metrics.json (expected a 'history' list of epochs with "
            f"{', '.join(HISTORY_KEYS)})"
        )
    damaged = "the file was edited or damaged; use the metrics.json that training wrote"
    for key in ("config", "environment"):
        value = metrics.get(key, {} if key == "config" else None)
        if not isinstance(value, dict):
            raise RunFileError(f"{path}: {key} is {value!r}, not an object: {damaged}")
    world_size = metrics["environment"].get("world_size", 1)  # none: one process
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise RunFileError(f"{path}: world_size is {world_size!r}, no number of ranks: {damaged}")
    for number, row in enumerate(history, 1):
        if row["epoch"] != number or not isinstance(row["epoch"], int):
            raise RunFileError(
                f"{path}: epoch {row['epoch']!r} is row {number} of the history, which must "
                f"hold epochs 1, 2, 3, ... in order, once each: {damaged}"
            )
        for key in (*HISTORY_KEYS, *(k for k in VAL_KEYS if k in row)):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                problem = "not a number"
            elif not math.isfinite(value):
                problem = "not a finite number"
            elif key.endswith("_acc") and not 0 <= value <= 1:
                problem = "not a fraction in [0, 1]"
            else:
                continue
            raise RunFileError(
                f"{path}: {key} of epoch {number} is {value!r}, {problem}: {damaged}"
            )
    return metrics


# --- one run folder ----------------------------------------------------------------------------


def check_same_recipe(saved: Config, config: Config, out: Path) -> None:
    """Refuse to resume the run in ``out``, started with ``saved``, with a ``config`` that
    differs in a field of its recipe (:data:`~eva_utils.config.RECIPE_FIELDS`)."""
    changed = ", ".join(
        f"{spelled('--' + name.replace('_', '-'), name)} {_flag_value(old)} -> {_flag_value(new)}"
        for (name, old), (_, new) in zip(saved.items(), config.items())
        if name in RECIPE_FIELDS and old != new and not (name == "data" and same_data(old, new))
    )
    if changed:
        raise RecipeChanged(
            f"cannot resume {out} with another recipe ({changed}): a run keeps the recipe it "
            f"started with; drop those {spelled('flags', 'changes')}, or start a new run with "
            f"{option('out')}"
        )


def _flag_value(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def recorded_device(folder: str | Path) -> str:
    """The device a run folder's metrics.json records (auto if it has none)."""
    path = Path(folder) / METRICS
    return read_metrics(path).get("config", {}).get("device", "auto") if path.is_file() else "auto"


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds a run that can be resumed (a ``last.pt`` file)."""
    return (Path(path) / LAST).is_file()


def epochs_done(path: str | Path) -> int:
    """How many epochs the run in folder ``path`` has finished and saved: 0 without a
    ``last.pt``, else the epochs that both its ``metrics.json`` and its ``last.pt`` record.
    :meth:`RunFolder.save` writes last.pt first, so a crash between the two leaves metrics.json
    behind; older versions wrote them the other way round. Either way the run counts as
    unfinished, and resuming it makes the files agree. Cheap: last.pt's history is read with its
    tensors memory-mapped, not loaded."""
    path = Path(path)
    if not holds_run(path) or not (path / METRICS).is_file():
        return 0
    return min(len(read_metrics(path / METRICS)["history"]), _checkpoint_epochs(path / LAST))


def _checkpoint_epochs(path: Path) -> int:
    """The epochs in the history of checkpoint ``path``; 0 if it cannot be read (resuming it
    then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return len(state["history"])
    except Exception:  # a truncated, foreign or old-style file: torch raises many kinds
        return 0


@dataclass
class RunFolder:
    """A run folder opened for training: checked once, its ``last.pt`` read once, and locked, so
    that one process at a time trains in it.

    ``state`` is the run state that ``last.pt`` holds when the run is resumed, None for a new
    run. The policy, one for the CLI, :func:`~eva_utils.training.fit` and the notebooks: a new run
    needs a folder without a run in it; a resumed run needs one with a ``last.pt``, the same
    recipe (:func:`check_same_recipe`), and a folder that can take the next checkpoint; neither
    starts while another process trains there. Close it (or use it as a context manager) to let
    the next one in.
    """

    path: Path
    state: dict[str, Any] | None = None
    _lock: int | None = field(default=None, repr=False)
    _created: bool = field(default=False, repr=False)
    # The folder as opened (a descriptor held open): a save checks the path is still it.
    _anchor: int | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, resume: bool = False) -> RunFolder:
        """Lock ``path`` and check it for a new run (``resume=False``), or read it to resume
        one. Raises RunFileError, in one line, saying what to do instead."""
        path = Path(path)
        # First: a name too long for the file system makes every look at the folder an OSError.
        check_output_folder(path, option("resume" if resume else "out"))
        if (path / LAST).exists() and not holds_run(path):  # a folder: no save replaces it
            raise CheckpointError(
                f"{path / LAST} is not a file: remove it, or choose another {option('out')}"
            )
        if resume and not holds_run(path):
            raise CheckpointError(
                f"{path} has no checkpoint ({LAST}) to resume: start a new run with {option('out')}"
            )
        folder = cls(path, _created=not path.exists())
        path.mkdir(parents=True, exist_ok=True)
        folder._lock = hold(path / LOCK)
        try:
            folder._anchor = open_folder(path)
            if not resume and holds_run(path):
                raise CheckpointError(
                    f"{path} already holds a run: continue it with "
                    f"{spelled(f'--resume {quoted(path)}', 'resume=True')}, or choose another "
                    f"{option('out')}"
                )
            if resume:
                folder.state = load_checkpoint(path / LAST)
            for name in (LAST, BEST, METRICS):  # the temporaries of writers that were killed;
                remove_dead_scratch(path, prefix=f".{name}.")  # a user's own .x.tmp stays
        except BaseException:
            folder.close()
            raise
        return folder

    @classmethod
    def peek(cls, path: str | Path, *, resume: bool = False) -> RunFolder:
        """The folder as a process that does not train in it sees it (the other ranks of a run
        that the main process opened): its ``last.pt`` read to resume, nothing locked,
        created or written."""
        folder = cls(Path(path))
        if resume:
            folder.state = load_checkpoint(folder.path / LAST)
        return folder

    def close(self) -> None:
        """Let another process train here; a folder this one made and left empty goes too."""
        if self._lock is not None:
            release(self.path / LOCK, self._lock)
            self._lock = None
        if self._created:
            with contextlib.suppress(OSError):  # not empty, or not ours now: it stays
                if self._still_there():
                    self.path.rmdir()
        if self._anchor is not None:
            os.close(self._anchor)
            self._anchor = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def saved_config(self) -> Config | None:
        return Config.from_dict(self.state["config"]) if self.state is not None else None

    @property
    def epochs_done(self) -> int:
        """The epochs the folder holds now (:func:`epochs_done`)."""
        return epochs_done(self.path)

    def check_recipe(self, config: Config) -> None:
        """Refuse to continue this folder's run with another recipe (a new run: no check)."""
        if self.state is not None:
            check_same_recipe(self.saved_config, config, self.path)

    def resumed_config(self, **changes: Any) -> Config:
        """The saved recipe with ``changes`` (fields that a resume may change), checked."""
        config = self.saved_config.replace(**changes)
        self.check_recipe(config)
        return config

    def save(self, state: dict[str, Any], environment: dict[str, str]) -> None:
        """Write best.pt (if the last epoch is best: best_key), last.pt, metrics.json atomically.

        ``state`` is :meth:`state.TrainingState.state_dict`. metrics.json goes last, so that it
        never records an epoch that last.pt (what a resume starts from) does not hold: a crash
        between the writes leaves last.pt one epoch ahead, :func:`epochs_done` counts the run as
        unfinished, and the resumed run rewrites metrics.json from it. A write that fails (disk
        full, read-only folder) raises CheckpointError and leaves the files it would replace.
        Ctrl-C and SIGTERM wait until the writes are done.
        """
        history = state["history"]
        self._check_still_there(history[-1]["epoch"])
        try:
            with signals_deferred():
                chosen_on, last = best_key(history), history[-1]
                if last[chosen_on] >= max(row[chosen_on] for row in history):
                    best = {key: state[key] for key in ("config", "classes", "model")}
                    best.update(
                        epoch=last["epoch"], test_acc=last["test_acc"], best_on=BEST_ON[chosen_on]
                    )
                    best.update({k: last[k] for k in VAL_KEYS if k in last})
                    save_checkpoint(best, self.path / BEST)
                save_checkpoint(state, self.path / LAST)
                config = Config.from_dict(state["config"])
                write_metrics(self.path / METRICS, config, history, environment)
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            room = _space_needed(self.path, state) if full else ""
            if holds_run(self.path):
                kept, then = "the files of the epochs before are kept", resume_command(self.path)
            else:
                kept, then = "no epoch is saved", train_command(self.path)
            raise CheckpointError(
                f"could not save epoch {history[-1]['epoch']} into {self.path} "
                f"({error.strerror or error}){room}; {kept}: free space or make the folder "
                f"writable, then {then}"
            ) from None

    def _check_still_there(self, epoch: int) -> None:
        """Refuse to save ``epoch`` into a folder that is no longer the one opened (removed,
        replaced, or a Drive whose mount point stayed, empty): saving would make a new folder
        in its place, on another disk, and the run would go on there unseen."""
        if self._anchor is not None and not self._still_there():
            raise CheckpointError(
                f"could not save epoch {epoch}: {self.path} is no longer the run folder this "
                "run started in (it was removed or replaced, or the drive it was on was "
                f"unmounted); nothing was written: bring the folder back (mount the drive "
                f"again), then {resume_command(self.path)}"
            )

    def _still_there(self) -> bool:
        """Whether the path is still the folder opened (True where that cannot be told)."""
        if self._anchor is None:
            return True
        try:
            return same_file(os.fstat(self._anchor), os.stat(self.path))
        except OSError:  # gone, or a parent replaced by a file
            return False
