"""Ctrl-C and SIGTERM: both stop the program the same way, but never in the middle of a write.

A SIGTERM (``kill``, a job scheduler, Colab stopping a cell) is turned into the
KeyboardInterrupt that Ctrl-C raises, so one ``except KeyboardInterrupt`` handles both.

A KeyboardInterrupt raised from a signal handler lands wherever Python happens to be, and C
code may lose it there: one raised while numpy's Cython modules are being imported is cleared
and never seen (measured: 1 of 60 timed interrupts, and an orphaned sweep child kept training
for minutes). So the handler also remembers the request, and the training loop asks
:func:`raise_if_stop_requested` between batches: a lost interrupt stops the run a batch later.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _in_main_thread() -> bool:
    # Python lets only the main thread install signal handlers.
    return threading.current_thread() is threading.main_thread()


# Set by a Ctrl-C or SIGTERM that a block below handles; cleared when the outermost block ends.
_stop_requested = threading.Event()


def _raise_keyboard_interrupt(signum, frame):
    _stop_requested.set()
    raise KeyboardInterrupt


def raise_if_stop_requested() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C or SIGTERM came within :func:`sigterm_as_interrupt`:
    the second chance of an interrupt that C code lost where it was raised."""
    if _stop_requested.is_set():
        raise KeyboardInterrupt


class StopChecked:
    """``batches`` (a loader) as they are, :func:`raise_if_stop_requested` asked before each
    one: a training loop over it stops a batch after an interrupt that C code lost."""

    def __init__(self, batches: Iterable[T]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[T]:
        for batch in self.batches:
            raise_if_stop_requested()
            yield batch


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does, and both are
    remembered for :func:`raise_if_stop_requested` (Ctrl-C where Python's own handler has it:
    a handler someone else installed is left alone)."""
    if not _in_main_thread():
        yield
        return
    outermost = signal.getsignal(signal.SIGTERM) is not _raise_keyboard_interrupt
    if outermost:  # a stop requested before this block belongs to an earlier one
        _stop_requested.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if outermost:
            _stop_requested.clear()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has finished, then raise KeyboardInterrupt.

    Around checkpoint writes: an interrupt inside ``torch.save`` surfaces as a RuntimeError
    from its zip writer instead of a KeyboardInterrupt, so the write is let finish (it takes a
    fraction of a second) and the interrupt is handled after it.
    """
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda s, frame: caught.append(s)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:  # raised here, by Python code: no C code can lose it
        raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ends_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child end when this process
    ends, however it ends (SIGKILL, SIGHUP from a closed terminal): the kernel sends the child
    SIGTERM, which stops it as Ctrl-C does, keeping its last finished epoch, so no orphan keeps
    training and holding its run folder's lock. Linux only (prctl); None elsewhere."""
    if sys.platform != "linux":
        return None
    return functools.partial(_end_with_parent, os.getpid())


def _end_with_parent(parent: int) -> None:
    """In the just-forked child: ask for SIGTERM when ``parent`` ends; if it already has
    (before the request took effect), stop now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl after all
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
