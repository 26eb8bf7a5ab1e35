"""Every file the project writes, written safely; every JSON file it reads, read with a one-line
error; and the scratch that killed processes leave behind, cleaned up.

- :func:`atomic_write` writes to a temporary name beside the target, flushes, and renames: a
  crash at any moment leaves the previous complete file, never a partial one.
- :func:`open_in_folder` opens a file of a folder for writing without following a symbolic
  link at its name: whatever a link there points to (a user's file, another folder) is never
  read, truncated or written; the link itself is replaced by a file of the folder.
- Scratch names (temporaries of :func:`atomic_write`, an archive being extracted) end in
  ``.<pid>.tmp``, so :func:`remove_dead_scratch` can tell a dead process's scratch from a live
  one's and never deletes what another process is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import RunFileError, option

log = logging.getLogger(__name__)
SCRATCH_SUFFIX = ".tmp"
NAME_MAX = 255  # bytes in one file or folder name: the limit of ext4, APFS, NTFS, tmpfs...
# What atomic_write's scratch name adds to a file's: "." before, ".XXXXXXXX.<pid>.tmp" after.
SCRATCH_ROOM = 32


def scratch_suffix() -> str:
    """The end of every scratch name this process makes: ``.<pid>.tmp``."""
    return f".{os.getpid()}{SCRATCH_SUFFIX}"


def make_scratch_folder(parent: str | Path, prefix: str) -> Path:
    """A new, empty scratch folder ``parent/<prefix>XXXX.<pid>.tmp``."""
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=scratch_suffix(), dir=parent))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=scratch_suffix(), dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would have,
        # where the file system has permissions to give (some FUSE and SMB mounts refuse).
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        atomic_rename(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_in_folder(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_CREAT, mode)`` for writing a file of ``path``'s folder, never
    through a symbolic link at ``path``: a link there is removed (its target is not touched)
    and a new file made in its place, with a note. Returns the file descriptor."""
    no_follow = getattr(os, "O_NOFOLLOW", 0)  # Windows has none, and no symbolic links to fear
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | no_follow, mode)
        except OSError as error:
            if error.errno != errno.ELOOP or not os.path.islink(path):
                raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the link, not what it points to
        log.warning("%s was a symbolic link: replaced it by a file, leaving its target", path)


def same_file(one: os.stat_result, other: os.stat_result) -> bool:
    """Whether two ``os.stat`` results are of one file or folder (device and inode)."""
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def open_folder(path: str | Path) -> int | None:
    """A descriptor of the folder ``path``, held to tell later whether ``path`` is still that
    folder (:func:`same_file`; holding it keeps its inode number, even on FUSE mounts that
    number folders as they are looked up). None where folders cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return None
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def atomic_rename(source: Path, target: Path) -> None:
    """Rename ``source`` (a finished scratch file or folder) to ``target`` in one step: readers
    see the old target or the new one, never a part. Raises OSError where ``target`` is a
    folder that is not empty (another process finished first)."""
    os.replace(source, target)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def printable(name: str) -> str:
    """A file name as text that can be drawn and written anywhere: bytes that are not UTF-8
    (which Python keeps as lone surrogates) shown as ``\\xff``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | Path, missing: str) -> Any:
    """The JSON value in ``path``. A missing, unreadable or invalid file raises RunFileError in
    one line; ``missing`` says what to do when the file does not exist."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path} does not exist: {missing}") from None
    except OSError as error:  # a folder, no permission...
        raise RunFileError(f"cannot read {path} ({error.strerror}): is it a file?") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise RunFileError(f"{path} is not valid JSON ({error}): is it a complete file?") from None
    except RecursionError:  # [[[[...]]]] deeper than Python's stack
        raise RunFileError(
            f"{path} nests its values too deeply to be read: it is not a file eva8 wrote"
        ) from None


def remove_dead_scratch(folder: Path, prefix: str = ".") -> list[Path]:
    """Remove the scratch files and folders (``<prefix>*.<pid>.tmp``) in ``folder`` whose
    process is no longer running: a ``kill -9`` or a power cut skips the clean-up. Scratch whose
    name holds no process id (older versions made such) counts as dead. Returns what was
    removed."""
    removed = []
    for scratch in Path(folder).glob(f"{prefix}*{SCRATCH_SUFFIX}"):
        pid = scratch.name[: -len(SCRATCH_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and process_exists(int(pid)):
            continue
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            scratch.unlink(missing_ok=True)
        removed.append(scratch)
    return removed


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` is running on this machine."""
    # On Windows os.kill(pid, 0) would terminate the process: treat every process as alive.
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def check_output_file(path: str | Path, flag: str | None = None) -> None:
    """:func:`check_output_folder` for the folder of the file ``path``, and that the file's
    name leaves room for the scratch name :func:`atomic_write` writes it under."""
    path = Path(path)
    check_output_folder(path.parent, flag)
    room = NAME_MAX - SCRATCH_ROOM
    if len(os.fsencode(path.name)) > room:
        raise RunFileError(
            f"the file name {path.name[:24]}... is {len(os.fsencode(path.name))} bytes, more than "
            f"the {room} that leave room for its temporary name: choose a shorter "
            f"{flag or option('out')}"
        )


def check_output_folder(folder: str | Path, flag: str | None = None) -> None:
    """Check, before any work whose results would go into ``folder``, that they can be written
    there: no name in its path is too long, and the folder, or its nearest existing ancestor, is
    a writable folder. Creates nothing.
    Raises RunFileError naming the folder and the cause, and ``flag`` (default: ``out``) as
    the setting to change."""
    folder = Path(folder)
    flag = flag or option("out")
    for name in folder.parts:
        if len(os.fsencode(name)) > NAME_MAX:
            raise RunFileError(
                f"the folder name {name[:24]}... is {len(os.fsencode(name))} bytes, more than the "
                f"{NAME_MAX} a file system allows in one name: choose a shorter {flag}"
            )
    existing = next(path for path in (folder, *folder.parents, Path.cwd()) if path.exists())
    if not existing.is_dir():
        raise RunFileError(f"{existing} is a file, not a folder: choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".eva8-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise RunFileError(
            f"cannot write into {existing} ({error.strerror or error}): choose a writable folder "
            f"with {flag}"
        ) from None
