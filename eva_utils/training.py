"""The epoch loop: ``fit`` trains a whole :class:`~eva_utils.config.Config` and returns its
history, saving each epoch into a run folder and turning Ctrl-C, SIGTERM and a diverged loss
into one line that says what the folder still holds."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, divergence_advice
from .data import ImageSet
from .devices import environment
from .errors import ConfigError, Interrupted, TrainingDiverged, resume_command
from .progress import epoch_bar
from .ranks import Ranks
from .runfolder import LAST, RunFolder
from .signals import sigterm_as_interrupt
from .state import TrainingState

Row = dict[str, Any]


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
    ``out/best.pt`` (when the test accuracy improves) and ``out/metrics.json``; with
    ``resume=True`` the run continues from ``out/last.pt``. ``out`` is a path, which fit opens,
    checks and closes itself, or a :class:`RunFolder` that the caller opened (and closes): then
    the folder's own state says whether the run is resumed. Ctrl-C or SIGTERM stop the run; the
    checkpoint of the last finished epoch stays, and :class:`~eva_utils.errors.Interrupted` says
    how to resume.
    """
    ranks = Ranks.from_environment()
    # Opened before the data is loaded: a refusal takes a moment, not the data set's load.
    with _opened(out, resume, config) as folder, sigterm_as_interrupt():
        state = None
        try:
            state = TrainingState(config, datasets, progress and ranks.is_main)
            if folder is not None and folder.state is not None:
                state.load_state_dict(folder.state)
                if folder.epochs_done != len(state.history) and ranks.is_main:
                    # killed between writing last.pt and metrics.json: make them agree again
                    folder.save(state.state_dict(), environment(state.device))
            _loop(state, folder, ranks, progress, on_epoch)
        except KeyboardInterrupt:
            raise _interrupted(folder, len(state.history) + 1 if state else 1) from None
        except TrainingDiverged as error:
            raise _diverged(error, config, folder) from None
    return state.history


def _opened(
    out: str | Path | RunFolder | None, resume: bool, config: Config
) -> contextlib.AbstractContextManager[RunFolder | None]:
    """The run folder to train in: the caller's, as it is; or ``out`` opened here (and closed
    when training ends), its recipe checked; or none."""
    if isinstance(out, RunFolder):
        return contextlib.nullcontext(out)
    if out is None:
        if resume:
            raise ConfigError("resume needs the run folder (out=...)")
        return contextlib.nullcontext()
    folder = RunFolder.open(out, resume=resume)
    try:
        folder.check_recipe(config)
    except BaseException:
        folder.close()
        raise
    return folder


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
    bar = epoch_bar(epochs, total=state.config.epochs, progress=progress)
    for epoch in bar:
        row = _train_and_test(state, epoch, ranks)
        bar.set_postfix(test_acc=f"{row['test_acc']:.2%}", loss=f"{row['test_loss']:.3f}")
        if folder is not None and ranks.is_main:
            folder.save(state.state_dict(), environment(state.device))
        ranks.wait_for_everyone()
        if on_epoch is not None:
            on_epoch(row)


def _train_and_test(state: TrainingState, epoch: int, ranks: Ranks) -> Row:
    """One epoch of ``state``, appended to its history; the test loss must be finite."""
    started = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    trained = ranks.reduce(state.train_epoch(epoch))
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
        "lr": lr,
        "seconds": time.perf_counter() - started,
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
        f"stopped in epoch {saved + 1}; {folder.path / LAST} holds epochs 1-{saved}: "
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
