"""A run folder's lock: one process trains in a folder at a time.

The lock is an flock on a lock file, which the system releases when its process ends in any
way (a kill -9 never leaves the folder locked); the file says who holds it, so that a refusal
can name the holder and a lock left by a dead holder is taken over with a note. Where there
are no flocks (Windows; a file system without them, as some network and FUSE mounts are),
nothing is locked, and the second case is said in one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import RunFileError, option
from .files import open_in_folder, same_file

log = logging.getLogger(__name__)
# What flock raises on a file system that has no locks: training goes on unlocked, not at all.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def hold(path: Path) -> int | None:
    """Hold the lock file ``path`` of the folder ``path.parent`` and write who holds it.
    Returns the open file, or None where nothing could be locked; raises RunFileError naming
    the process that holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    folder = path.parent
    while True:
        fd = open_in_folder(path, os.O_RDWR)  # a symbolic link there is replaced, not followed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise RunFileError(
                f"{folder} is being trained by {holder}: wait until it has finished (or stop "
                f"it), or choose another {option('out')}"
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in NO_LOCKS:
                raise
            with contextlib.suppress(OSError):
                os.unlink(path)
            log.warning(
                "%s: its file system cannot lock files (%s), so training goes on unlocked: two "
                "sessions must not train this run at once",
                folder,
                error.strerror or error,
            )
            return None
        # Its last holder may have unlinked the file between our open and our lock: then we
        # hold a file nobody else will see, and must lock the one at the path instead.
        with contextlib.suppress(FileNotFoundError):
            if same_file(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        os.close(fd)
    previous = _holder(fd)
    if previous:
        log.warning(
            "%s: took over the run folder's lock from %s, which no longer holds it (it stopped "
            "without releasing it: killed, or on another machine)",
            folder,
            previous,
        )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)  # _holder read to the end: writing there would lead with NULs
    host = socket.gethostname()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "since": since}).encode())
    return fd


def release(path: Path, fd: int) -> None:
    """Let go of the lock file ``path`` that ``fd`` (from :func:`hold`) holds. Where ``path`` is
    no longer that file (the folder was removed, or replaced by another), nothing is removed."""
    with contextlib.suppress(OSError):
        if same_file(os.stat(path, follow_symlinks=False), os.fstat(fd)):
            os.unlink(path)  # while still holding it: see hold
    os.close(fd)


def _holder(fd: int) -> str:
    """Who the lock file says holds it ("process 123 on HOST since ..."), or "" if empty."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip("\0")  # older versions led with NULs
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return f"another process ({text.strip()!r})" if text.strip() else ""
