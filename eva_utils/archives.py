"""Archives of the data set: a .tar(.gz) extracted once into a cache folder, checked against
the archive's own image count, and the image files of an extracted (or any) ImageFolder found
the way torchvision's ImageFolder finds them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path, PurePosixPath

import torch

from .errors import DataError, data_hint
from .files import atomic_rename, make_scratch_folder, remove_dead_scratch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm"}
# Files an extracted archive keeps beside its images: the image count it must hold (counted from
# the archive's member list, not from what reached the disk), and the decoded tensors.
MANIFEST = ".manifest.json"
MANIFEST_KEY = "archive_images"
DECODED = ".decoded.pt"
CACHE_ENV = "EVA8_CACHE"
# Errors writing the extracted copy that are the cache folder's fault, not the archive's.
CACHE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def default_cache_dir() -> Path:
    """``$EVA8_CACHE``, else ~/.cache/eva8. An empty EVA8_CACHE counts as unset: as a path it
    would be the working folder, and the archive would be extracted there."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "eva8")


def extract_archive(archive: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract a .tar(.gz) once into the cache; later calls return the same folder at once,
    unless it no longer holds what the archive does (then it is extracted again)."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    name = archive.name.split(".")[0]
    target = Path(cache_dir or default_cache_dir()) / f"{name}-{key.hexdigest()[:12]}"
    if os.path.isdir(target):  # False, not PermissionError, in a folder we may not search
        if _cache_is_complete(target):
            return target
        shutil.rmtree(target, ignore_errors=True)  # another process may be removing it too
    if not tarfile.is_tarfile(archive):
        raise DataError(f"{archive} is not a .tar or .tar.gz archive: {data_hint()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_scratch(target.parent)
        # Extract beside the target and rename, so an interrupted extraction is never mistaken
        # for a finished one; the process id in the name tells whose scratch it is.
        scratch = make_scratch_folder(target.parent, f".{name}-")
    except OSError as error:
        raise _unusable_cache(target.parent, error, cache_dir) from error
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
            expected = _archive_image_count(tar.getmembers())  # read by extractall: no re-read
        _check_extracted(scratch, expected, archive)
        (scratch / MANIFEST).write_text(json.dumps({MANIFEST_KEY: expected}))
        try:
            atomic_rename(scratch, target)
        except OSError:
            if not _cache_is_complete(target):
                raise
            # another process extracted the same archive meanwhile: use its copy
    except tarfile.FilterError as error:
        reason = (
            "is a device or other special file"
            if isinstance(error, tarfile.SpecialFileError)
            else "leads outside the archive's folder"
        )
        raise DataError(
            f"{archive} holds {error.tarinfo.name!r}, which {reason}: the archive was not "
            "extracted; use a trusted copy of the data set"
        ) from error
    except (tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, OSError) and error.errno in CACHE_ERRNOS:  # a full or read-only disk
            raise _unusable_cache(target.parent, error, cache_dir) from error
        raise DataError(
            f"could not extract {archive} ({error}): is it a complete download?"
        ) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _unusable_cache(folder: Path, error: OSError, cache_dir: str | os.PathLike | None) -> DataError:
    """One line saying why the cache ``folder`` cannot hold the extracted archive, and what to
    do: set EVA8_CACHE (or, for a caller that chose the folder, pass another ``cache_dir``)."""
    if cache_dir:
        origin, advice = "", "pass a writable cache_dir"
    else:
        origin = f" (from {CACHE_ENV})" if os.environ.get(CACHE_ENV) else ""
        advice = f"set {CACHE_ENV} to a writable folder"
    place = f"the archive cache {folder}{origin}"
    # mkdir says "File exists" or "Not a directory": say which file is in the way instead
    blocking = next((p for p in (folder, *folder.parents) if _is_not_folder(p)), None)
    if blocking == folder:
        return DataError(f"{place} is a file, not a folder: {advice}")
    if blocking is not None:
        return DataError(f"{place} cannot be made: {blocking} is a file, not a folder: {advice}")
    return DataError(f"cannot write into {place} ({error.strerror or error}): {advice}")


def _is_not_folder(path: Path) -> bool:
    # os.path answers False where Path.exists() raises (a folder we may not search)
    return os.path.exists(path) and not os.path.isdir(path)


def _check_extracted(scratch: Path, expected: int, archive: Path) -> None:
    """Refuse an extracted copy that lost files while it was written: a folder deleted during the
    extraction (a user clearing caches, a tmp cleaner) takes the images extracted so far with it,
    and tarfile recreates missing folders and carries on, so nothing else notices. Failing beats
    retrying here: whatever deleted the files may do it again, and the user should know."""
    try:
        found = _count_images(scratch)
    except OSError:  # the scratch folder itself was deleted
        found = 0
    if found != expected:
        raise DataError(
            f"files were deleted from {scratch.parent} while {archive} was extracted into it "
            f"({found:,} of its {expected:,} images are left; nothing was kept): run again, and "
            f"if it happens again, set {CACHE_ENV} to a folder that no cleaner touches"
        )


def _archive_image_count(members: list[tarfile.TarInfo]) -> int:
    """How many images loading the archive's extracted copy decodes, from its member list alone:
    the split root, class folders and image names are found as :func:`_count_images` finds them
    on disk (0 when it has no train/ and test/: the load reports that)."""
    # tarfile strips leading slashes and resolves "." and ".." (the data filter keeps the result
    # inside the folder); folders are present on disk even when only their files are members.
    named = [(m, PurePosixPath(posixpath.normpath(m.name.lstrip("/")))) for m in members]
    paths = {path for _, path in named}
    folders = {path for member, path in named if member.isdir()}
    folders |= {parent for path in paths for parent in path.parents}
    top = PurePosixPath(".")

    def has_splits(p: PurePosixPath) -> bool:
        return p / "train" in folders and p / "test" in folders

    children = [f for f in folders if f.parent == top and f != top and is_listed(f.name)]
    if has_splits(top):
        root = top
    elif len(children) == 1 and has_splits(children[0]):
        root = children[0]
    else:
        return 0
    splits = (root / "train", root / "test")
    return sum(
        1
        for path in paths | folders
        if path.parent.parent in splits and is_listed(path.parent.name) and is_image(path.name)
    )


def _cache_is_complete(folder: Path) -> bool:
    """Whether an extracted archive still holds every image its manifest counts: training on a
    cache that lost files would silently train on fewer images than the archive holds."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())[MANIFEST_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    decoded = folder / DECODED
    if decoded.is_file():  # the tensors are what training reads; mmap reads only the labels
        state = torch.load(decoded, weights_only=True, mmap=True)
        return sum(len(s["labels"]) for s in state) == expected
    return _count_images(folder) == expected


def _count_images(folder: Path) -> int:
    """How many images loading the extracted archive ``folder`` decodes (0 when it has no train/
    and test/: the load reports that)."""
    root = split_root(folder)
    if root is None:
        return 0
    return sum(len(list_images(root / split)[1]) for split in ("train", "test"))


def split_root(path: Path) -> Path | None:
    """``path`` itself if it holds train/ and test/, or its only sub-folder that does."""

    def has_splits(p: Path) -> bool:
        return (p / "train").is_dir() and (p / "test").is_dir()

    if has_splits(path):
        return path
    children = [c for c in path.iterdir() if c.is_dir() and is_listed(c.name)]
    if len(children) == 1 and has_splits(children[0]):
        return children[0]
    return None


def list_images(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names under ``folder`` (sorted, as torchvision's ImageFolder) and the image
    files in them with their labels."""
    classes = sorted(c.name for c in folder.iterdir() if c.is_dir() and is_listed(c.name))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if is_image(path.name)
    ]
    return classes, files


def is_listed(folder_name: str) -> bool:
    """Whether a folder counts as a class (or the data set's root): hidden ones do not."""
    return not folder_name.startswith(".")


def is_image(file_name: str) -> bool:
    """Whether a file in a class folder is loaded as an image (by its suffix, as ImageFolder)."""
    return PurePosixPath(file_name).suffix.lower() in IMAGE_SUFFIXES
