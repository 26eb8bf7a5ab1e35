"""Errors a user can fix, and the words their messages use for settings.

The CLI prints an error's message as one line and exits non-zero. A message names a setting the
way its reader gives it: ``train_size``, ``out=...``, ``fit(..., resume=True)`` for the library
and the notebooks, ``--train-size``, ``--out``, ``--resume RUN`` where the command line runs
(:func:`command_line_words`, which the CLI enters before any work).
"""

from __future__ import annotations

import contextlib
import contextvars
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_COMMAND_LINE = contextvars.ContextVar("eva8_command_line_words", default=False)


@contextlib.contextmanager
def command_line_words() -> Iterator[None]:
    """Within the block, messages name settings as command-line flags."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def spelled(command_line: str, library: str) -> str:
    """``command_line`` where the command line runs (:func:`command_line_words`), else
    ``library``: the same advice in its reader's words."""
    return command_line if _COMMAND_LINE.get() else library


def option(name: str, value: Any = None) -> str:
    """How the reader gives the setting ``name`` (a Config field or an argument of ``fit``):
    ``--train-size 64`` on the command line, ``train_size=64`` from Python (without ``value``:
    ``--train-size``, ``train_size=...``)."""
    flag = "--" + name.replace("_", "-")
    if value is None:
        return spelled(flag, f"{name}=...")
    return spelled(f"{flag} {value}", f"{name}={value}")


def quoted(path: str | Path) -> str:
    """``path`` as a shell reads it back, pasted into a command line: ``'x;touch PWNED'``."""
    return shlex.quote(str(path))


def train_command(folder: str | Path) -> str:
    """How to train a new run into ``folder``."""
    return spelled(
        f"python -m eva_utils train --out {quoted(folder)}", f"fit(config, out={str(folder)!r})"
    )


def resume_command(folder: str | Path) -> str:
    """How to continue the run in ``folder``."""
    return spelled(
        f"python -m eva_utils train --resume {quoted(folder)}",
        f"fit(config, out={str(folder)!r}, resume=True)",
    )


def epochs_held(count: int) -> str:
    """The epochs a run folder holds, in words: "epoch 1", "epochs 1-5"."""
    return "epoch 1" if count == 1 else f"epochs 1-{count}"


def data_hint() -> str:
    """What to do when no data set was given or found."""
    return (
        f"pass {option('data', 'PATH')} (an ImageFolder with train/ and test/, or a .tar.gz of one)"
    )


class EvaError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(EvaError, ValueError):
    """A hyperparameter or option that cannot work (non-positive epochs, unknown preset...)."""


class DataError(EvaError):
    """The data set is missing, unreadable or malformed."""


class RunFileError(EvaError):
    """A run folder or a file of a run (metrics.json, analysis.json, provenance.json...) that
    cannot be used."""


class CheckpointError(RunFileError):
    """A checkpoint (``last.pt``, ``best.pt``) that cannot be used."""


class RecipeChanged(CheckpointError, ConfigError):
    """A resume that would change the run's recipe: a setting refused (a ConfigError: every
    rank of a run refuses it alike, and the main process says it once)."""


class TrainingDiverged(EvaError):
    """The loss became NaN or infinite."""


class Interrupted(EvaError):
    """Ctrl-C or SIGTERM stopped training; the message says how to resume."""


class DataFileError(DataError):
    """A file or folder of the data set that cannot be used. ``path`` names it and ``problem``
    says what is wrong ("is not a readable image"), so that a caller which extracted the data
    from an archive can name the archive's member instead of its own copy."""

    def __init__(self, message: str, path: str, problem: str) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem
