"""The epoch loop: ``fit`` trains a whole :class:`~eva_utils.config.Config` and returns its
history, saving each epoch into a run folder and turning Ctrl-C, SIGTERM and a diverged loss
into one line that says what the folder still holds."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config import Config, data_source, divergence_advice, preset_name, refuse
from .data import ImageSet, check_out_of_data
from .devices import describe, environment, select_device
from .errors import (
    ConfigError,
    EvaError,
    Interrupted,
    TrainingDiverged,
    epochs_held,
    option,
    resume_command,
    spelled,
)
from .precision import emulation_note
from .progress import epoch_bar, note
from .ranks import Ranks
from .results import describe_data
from .runfolder import LAST, RunFolder
from .signals import StopChecked, sigterm_as_interrupt
from .state import TrainingState

Row = dict[str, Any]
# The estimate of a long run: the steps timed (after one untimed warm-up step) and the length of
# a run worth warning about. ``clock`` is what times them (tests give it a fake one).
ESTIMATE_AFTER_STEPS = 5
LONG_RUN_SECONDS = 3600
clock = time.perf_counter


def fit(
    config: Config,
    *,
    out: str | Path | RunFolder | None = None,
    resume: bool = False,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    progress: bool = True,
    on_epoch: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Train ``config.epochs`` epochs and return the history, one dict per epoch.

    With ``out``, every epoch atomically rewrites ``out/last.pt`` (everything needed to resume),
    ``out/best.pt`` (when the validation accuracy improves; without ``config.val_size``, the
    test accuracy) and ``out/metrics.json``; with
    ``resume=True`` the run continues from ``out/last.pt``. ``out`` is a path, which fit opens,
    checks and closes itself, or a :class:`RunFolder` that the caller opened
    (:func:`open_run_folder`) and closes: then the folder's own state says whether the run is
    resumed. Ctrl-C or SIGTERM stop the run; the checkpoint of the last finished epoch stays, and
    :class:`~eva_utils.errors.Interrupted` says how to resume.

    Started by ``torchrun`` on N processes, the N train one run (:mod:`eva_utils.ranks`):
    ``batch_size`` stays the global batch, each BatchNorm normalises one process's slice of it
    (so N processes with ``norm="bn"`` train what one process trains with ``norm="gbn",
    num_splits=N``), and only the main process writes the run folder and shows progress.
    """
    ranks = start_ranks(config.device, config.batch_size, run_settings(config, out))
    # Opened before the data is loaded: a refusal takes a moment, not the data set's load.
    with _opened(out, resume, config, ranks) as folder, sigterm_as_interrupt():
        state = None
        try:
            recorded = config.replace(data=data_source(config.data))  # found from any folder
            state = TrainingState(recorded, datasets, progress and ranks.is_main, ranks)
            if slow := emulation_note(state.device, config.precision):
                note(slow, ranks.is_main)
            if folder is not None and folder.state is not None:
                state.load_state_dict(folder.state)
                if change := precision_change(state):
                    note(change, ranks.is_main)
                if folder.epochs_done != len(state.history) and ranks.is_main:
                    # killed between writing last.pt and metrics.json: make them agree again
                    folder.save(state.state_dict(), _environment(state))
            _loop(state, folder, ranks, progress, on_epoch)
        except KeyboardInterrupt:
            raise _interrupted(folder, len(state.history) + 1 if state else 1) from None
        except TrainingDiverged as error:
            raise _diverged(error, config, folder) from None
    return state.history


def start_ranks(
    device: str, batch_size: int | None = None, settings: Mapping[str, Any] | None = None
) -> Ranks:
    """This process's ranks, joined to the others (a world of 1 without torchrun), once every
    rank is known to have been given the same ``settings`` (:meth:`Ranks.check_same`) and to
    be able to share batches of ``batch_size``."""
    ranks = Ranks.from_environment()
    ranks.join(ranks.local_device(select_device(device)))
    if settings is not None:
        ranks.check_same(settings)
    if batch_size is not None:
        refuse(ranks.batch_problem(batch_size))
    return ranks


def run_settings(config: Config, out: str | Path | RunFolder | None) -> dict[str, Any]:
    """What every rank of one run must have been given alike: its config and its run folder."""
    folder = out.path if isinstance(out, RunFolder) else out
    return {**config.to_dict(), "out": None if folder is None else str(folder)}


@contextlib.contextmanager
def open_run_folder(ranks: Ranks, path: str | Path, resume: bool) -> Iterator[RunFolder]:
    """The run folder as this process uses it: opened, checked and locked by the main process
    (:meth:`RunFolder.open`), whose word the others wait for, and read by the others without
    writing anything (:meth:`RunFolder.peek`); closed when the block ends."""
    if not ranks.is_main:
        ranks.agree(None)  # raises if the main process could not open it
        yield RunFolder.peek(path, resume=resume)
        return
    try:
        folder = RunFolder.open(path, resume=resume)
    except EvaError as error:
        ranks.agree(str(error))
        raise
    ranks.agree(None)
    with folder:
        yield folder


@contextlib.contextmanager
def _opened(
    out: str | Path | RunFolder | None, resume: bool, config: Config, ranks: Ranks
) -> Iterator[RunFolder | None]:
    """The run folder to train in: the caller's, as it is; or ``out`` opened here (and closed
    when training ends), its recipe checked; or none."""
    if isinstance(out, RunFolder):
        yield out
    elif out is None:
        if resume:
            raise ConfigError(f"resume needs the run folder ({option('out')})")
        yield None
    else:
        check_out_of_data(out, config.data)
        with open_run_folder(ranks, out, resume) as folder:
            folder.check_recipe(config)
            yield folder


def _environment(state: TrainingState) -> dict[str, Any]:
    """What metrics.json records about where the run computed, and how it normalised."""
    config = state.config
    ghost_batches = config.num_splits if config.norm == "gbn" else 1
    return {
        **environment(state.device),
        **state.ranks.normalisation(config.batch_size, ghost_batches),
    }


def _loop(
    state: TrainingState,
    folder: RunFolder | None,
    ranks: Ranks,
    progress: bool,
    on_epoch: Callable[[Row], None] | None,
) -> None:
    """Train the epochs the run still lacks, saving each one."""
    progress = progress and ranks.is_main
    epochs = range(len(state.history) + 1, state.config.epochs + 1)
    note(start_line(state, folder), progress)
    checked = state.train_loader = StopChecked(state.train_loader)  # a lost interrupt stops it
    if epochs and progress:  # time the first steps: is this a run of many hours?
        state.train_loader = _Estimate(checked, len(checked) * len(epochs), state, folder)
    bar = epoch_bar(epochs, total=state.config.epochs, progress=progress)
    for epoch in bar:
        ranks.seed(state.config.seed, epoch)
        row = _train_and_test(state, epoch, ranks)
        state.train_loader = checked
        bar.set_postfix(test_acc=f"{row['test_acc']:.2%}", loss=f"{row['test_loss']:.3f}")
        if folder is not None and ranks.is_main:
            folder.save(state.state_dict(), _environment(state))
        ranks.wait_for_everyone()  # no rank goes on before the epoch is saved
        if on_epoch is not None:
            on_epoch(row)


def precision_change(state: TrainingState) -> str:
    """The line that says a resumed run now computes in another number format than its last
    epoch did (``precision auto`` on other hardware: bf16 on an A100, fp16 on a T4), or ""."""
    before, now = state.history[-1].get("precision") if state.history else None, state.precision
    if before is None or before == now.name:  # older runs did not record it: nothing to compare
        return ""
    return (
        f"note: this run continues in {now.name} ({option('precision', state.config.precision)} "
        f"on this hardware); its epochs up to {len(state.history)} were trained in {before}"
    )


def start_line(state: TrainingState, folder: RunFolder | None) -> str:
    """What is about to be trained, where, on what and into which folder, in one line."""
    config, done = state.config, len(state.history)
    name, world_size = preset_name(config, state.ranks.world_size), state.ranks.world_size
    recipe = f"{name} preset" if name else "custom recipe"
    recipe += f" on {world_size} ranks" if world_size > 1 else ""
    source, _ = describe_data(config.to_dict())
    resumed = f" (resumed after epoch {done})" if done else ""
    epochs = "epoch" if config.epochs == 1 else "epochs"
    where = folder.path if folder is not None else f"none ({spelled('--out', 'out=...')} keeps one)"
    validation = f", {len(state.val_set):,} validation" if state.val_set is not None else ""
    return (
        f"{recipe}, {config.epochs} {epochs}{resumed}, on "
        f"{describe(state.device, state.precision)}; "
        f"data: {source}, {len(state.train_set):,} train{validation} and "
        f"{len(state.test_set):,} test images; run folder: {where}"
    )


class _Estimate:
    """``loader`` that times its first training steps and, if the whole run would take more
    than :data:`LONG_RUN_SECONDS`, says once how long, and on a CPU how to take a short look
    instead. Never a refusal: the user may want the long run."""

    def __init__(self, loader, steps_left: int, state: TrainingState, folder: RunFolder | None):
        self.loader, self.steps_left, self.state, self.folder = loader, steps_left, state, folder

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        started = None
        for number, batch in enumerate(self.loader):
            if number == 1:  # step 0 warms up: allocations, kernel choices
                started = clock()
            elif started is not None and number == 1 + ESTIMATE_AFTER_STEPS:
                self._say((clock() - started) / ESTIMATE_AFTER_STEPS)
                started = None
            yield batch

    def _say(self, per_step: float) -> None:
        total = per_step * self.steps_left
        if total <= LONG_RUN_SECONDS:
            return
        device = self.state.device.type.upper()
        line = (
            f"estimated {_duration(total)} of training for this run ({per_step:.2f} s per step "
            f"on this {device}, {self.steps_left:,} steps to go)"
        )
        if self.state.device.type == "cpu":
            line += f"; full runs are meant for a GPU: for a short look, {_short_look(self.state)}"
        note(line, True)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _short_look(state: TrainingState) -> str:
    """The command (or call) that trains a few epochs of the same recipe on a subset."""
    config, name = state.config, preset_name(state.config)
    look = {"epochs": 3, "train_size": min(5000, len(state.train_set)),
            "test_size": min(1000, len(state.test_set))}  # fmt: skip
    if config.val_size:  # a smaller split, that leaves most of the 5000 to train on
        look["val_size"] = min(config.val_size, 1000)
    flags = [f"--preset {name}"] if name else []
    flags += [f"--{key.replace('_', '-')} {value}" for key, value in look.items()]
    if config.data:
        flags.append(f"--data {config.data}")
    changes = ", ".join(f"{key}={value}" for key, value in look.items())
    return spelled(
        f"python -m eva_utils train --out runs/short-look {' '.join(flags)}",
        f"fit(config.replace({changes}), out='runs/short-look')",
    )


def _train_and_test(state: TrainingState, epoch: int, ranks: Ranks) -> Row:
    """One epoch of ``state``, appended to its history (with the validation split's loss and
    accuracy where it has one); the test loss must be finite."""
    started = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    trained = ranks.reduce(state.train_epoch(epoch))
    ranks.average_buffers(state.model)  # the statistics of one ghost batch per rank
    validated = ranks.reduce(state.val_epoch(epoch)) if state.val_set is not None else None
    tested = ranks.reduce(state.test_epoch(epoch))
    if not math.isfinite(tested["loss"]):
        raise TrainingDiverged(
            f"the test loss became NaN or infinite after epoch {epoch} (the weights diverged "
            "in its last steps)"
        )
    row = {
        "epoch": epoch,
        "train_loss": trained["loss"],
        "train_acc": trained["acc"],
        "test_loss": tested["loss"],
        "test_acc": tested["acc"],
        **({"val_loss": validated["loss"], "val_acc": validated["acc"]} if validated else {}),
        "lr": lr,
        "seconds": time.perf_counter() - started,
        "precision": state.precision.name,  # what "auto" resolved to on this epoch's hardware
    }
    state.history.append(row)
    return row


def _interrupted(folder: RunFolder | None, epoch: int) -> Interrupted:
    """What Ctrl-C or SIGTERM in ``epoch`` leaves, and how to continue."""
    if folder is None:
        return Interrupted(
            f"stopped in epoch {epoch}; without a run folder (out=...) there is nothing to resume"
        )
    saved = folder.epochs_done
    if not saved:
        return Interrupted("stopped in epoch 1; no epoch had finished, nothing to resume")
    return Interrupted(
        f"stopped in epoch {saved + 1}; {folder.path / LAST} holds {epochs_held(saved)}: "
        f"resume with: {resume_command(folder.path)}"
    )


def _diverged(
    error: TrainingDiverged, config: Config, folder: RunFolder | None
) -> TrainingDiverged:
    """The divergence, with what to change and what the run folder still holds."""
    message = f"{error}: {divergence_advice(config)}"
    saved = folder.epochs_done if folder is not None else 0
    if saved:
        message += (
            f", in a new run (a run keeps its recipe); {folder.path / LAST} keeps epochs "
            f"1-{saved}, the last good ones"
        )
    return TrainingDiverged(message)
