"""Ctrl-C and SIGTERM: both stop the program the same way, but never in the middle of a write.

A SIGTERM (``kill``, a job scheduler, Colab stopping a cell) is turned into the
KeyboardInterrupt that Ctrl-C raises, so one ``except KeyboardInterrupt`` handles both.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


def _in_main_thread() -> bool:
    # Python lets only the main thread install signal handlers.
    return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if caught:
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
