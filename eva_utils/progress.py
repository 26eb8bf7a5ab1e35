"""Progress bars: ``tqdm.auto`` (widgets in Jupyter, text in a terminal), imported once here.

Bars only where they can redraw in place: in Jupyter and on a terminal. Where stderr goes to a
file or a pipe (a log), the per-batch bars are off and training writes one plain line per
epoch instead of the carriage returns and cursor moves of redrawn bars. Nothing here writes
colour codes, with or without ``NO_COLOR``.

Where Jupyter runs without ipywidgets, tqdm.auto falls back to text bars, which work, and warns
with the path of this machine's site-packages; that warning would end up in the notebooks'
stored outputs, so it is silenced.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

__all__ = ["bar", "batch_bar", "epoch_bar", "note", "redraws", "tqdm"]


def redraws() -> bool:
    """Whether a bar can redraw in place now: in Jupyter (the module tqdm.auto looks for), or
    with stderr a terminal that is not ``TERM=dumb``."""
    if "ipykernel.zmqshell" in sys.modules:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def bar(iterable: Iterable, *, progress: bool = True, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, shown only with ``progress`` where bars redraw."""
    return tqdm(iterable, disable=not (progress and redraws()), **options)


def batch_bar(loader: Iterable, *, desc: str = "", progress: bool = True) -> tqdm:
    """The batches of ``loader`` behind a progress bar (its length from ``len(loader)``).

    tqdm wraps one iterator, never the loader itself: ``tqdm.auto`` calls ``iter()`` on what it
    wraps when it is built and again when it is looped over, and each ``iter()`` of a DataLoader
    draws from its generator (a different shuffle than the plain loop's) and starts its workers.
    """
    total = len(loader) if hasattr(loader, "__len__") else None
    return bar(iter(loader), total=total, desc=desc, progress=progress, leave=False)


def note(text: str, progress: bool = True) -> None:
    """One line for the person watching the progress (with ``progress``), on stderr, without
    breaking a bar that is being drawn."""
    if progress:
        tqdm.write(text, file=sys.stderr)


class EpochLines:
    """The epoch bar where bars cannot redraw: after each epoch one line on stderr,
    ``epoch 2/30: test_acc 45.10%, loss 1.234``, from what :meth:`set_postfix` was given."""

    def __init__(self, epochs: Iterable[int], total: int, desc: str = "epoch") -> None:
        self.epochs, self.total, self.desc = epochs, total, desc
        self.postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator[int]:
        for epoch in self.epochs:
            self.postfix = {}
            yield epoch  # the line follows the epoch's work, when the loop asks for the next
            values = ", ".join(f"{key} {value}" for key, value in self.postfix.items())
            print(f"{self.desc} {epoch}/{self.total}: {values}", file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values


def epoch_bar(epochs: range, *, total: int, progress: bool = True) -> tqdm | EpochLines:
    """A bar over ``epochs`` (the last ones of ``total``), or, where bars cannot redraw, one
    plain line per epoch; nothing without ``progress``."""
    if progress and not redraws():
        return EpochLines(epochs, total)
    return tqdm(epochs, desc="epochs", initial=epochs.start - 1, total=total, disable=not progress)
