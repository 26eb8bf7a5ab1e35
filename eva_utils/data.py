"""CIFAR-10 as in-memory uint8 tensors, from torchvision's download, a local folder or archive.

Every source ends as an :class:`ImageSet`: ``images`` (N, 3, H, W) uint8 and ``labels`` (N,)
int64 on the CPU, plus the class names. Loaders (``loaders.py``) turn an ImageSet into batches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import DataError, DataFileError
from .files import atomic_rename, atomic_write, make_scratch_folder, remove_dead_scratch

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel statistics of the CIFAR-10 training set. pytorch-cifar's often copied std
# (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the data set's std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# (height, width) the pytorch-cifar ResNet18 is built for: its final 4x4 average pool must see
# 4x4 maps, and larger images make the linear layer's input too wide.
IMAGE_SIZE = (32, 32)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm"}
SYNTHETIC = "synthetic"
HINT = "pass --data PATH (an ImageFolder with train/ and test/, or a .tar.gz of one)"
# Files an extracted archive keeps beside its images: the image count it must hold, and the
# decoded tensors. The manifest's key says the count was taken from the archive's member list:
# older versions counted the images that reached the disk, which a cache cleaner running during
# the extraction made too few, so their manifests ("images") are not trusted.
MANIFEST = ".manifest.json"
MANIFEST_KEY = "archive_images"
DECODED = ".decoded.pt"
CACHE_ENV = "EVA8_CACHE"
# Errors writing the extracted copy that are the cache folder's fault, not the archive's.
CACHE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class ImageSet:
    """Images (N, 3, H, W) uint8, labels (N,) int64 and class names, all on the CPU."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def load_cifar10(
    source: str | os.PathLike | None = None,
    *,
    root: str | os.PathLike = "./data",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[ImageSet, ImageSet]:
    """The (train, test) sets from ``source``.

    ``source`` is ``None`` (torchvision's CIFAR-10, downloaded into ``root`` if needed), a folder
    ``<source>/train/<class>/*`` and ``<source>/test/<class>/*`` (or one folder holding such a
    pair), a ``.tar.gz`` of such a folder (extracted once into ``cache_dir``), or ``"synthetic"``
    (a tiny learnable stand-in for smoke runs).
    """
    if source is None:
        return _torchvision_cifar10(Path(root))
    if str(source) == SYNTHETIC:
        return synthetic_cifar10()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist: {HINT}")
    if path.is_file():
        sets = _decoded_archive(path, cache_dir)
    else:
        sets = _image_folder_pair(_find_split_root(path))
    _check_image_size(sets, path)
    return sets


def _check_image_size(sets: tuple[ImageSet, ImageSet], source: Path) -> None:
    """Refuse images the model cannot take, here rather than as a shape error deep inside it."""
    for split, dataset in zip(("train", "test"), sets):
        height, width = dataset.images.shape[2:]
        if (height, width) != IMAGE_SIZE:
            size = f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}"
            raise DataError(
                f"{split} images in {source} are {width}x{height} pixels, but ResNet18 is built "
                f"for CIFAR-10's {size}: resize them to {size}"
            )


def _decoded_archive(
    archive: Path, cache_dir: str | os.PathLike | None
) -> tuple[ImageSet, ImageSet]:
    """Extract and decode an archive once and keep the tensors beside it (60,000 JPEGs take
    about 10 s to decode, the saved tensors well under one)."""
    folder = extract_archive(archive, cache_dir)
    decoded = folder / DECODED
    if decoded.is_file():
        state = torch.load(decoded, weights_only=True)
        return tuple(ImageSet(s["images"], s["labels"], tuple(s["classes"])) for s in state)
    remove_dead_scratch(folder)
    try:
        sets = _image_folder_pair(_find_split_root(folder))
    except DataFileError as error:
        # The extracted copy is ours, not the user's: they repair the archive, not the cache.
        member = Path(error.path).relative_to(folder).as_posix()
        raise DataError(
            f"{member} in {archive} {error.problem}: fix or re-download the archive"
        ) from error
    tensors = [{"images": s.images, "labels": s.labels, "classes": list(s.classes)} for s in sets]
    atomic_write(decoded, lambda file: torch.save(tensors, file))
    return sets


def _torchvision_cifar10(root: Path) -> tuple[ImageSet, ImageSet]:
    from torchvision.datasets import CIFAR10

    try:
        sets = [CIFAR10(str(root), train=train, download=True) for train in (True, False)]
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise DataError(
            f"could not download CIFAR-10 into {root} ({error.__class__.__name__}); "
            f"without a network, {HINT}"
        ) from error
    return tuple(
        ImageSet(
            torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(s.targets, dtype=torch.int64),
            tuple(s.classes),
        )
        for s in sets
    )


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
        raise DataError(f"{archive} is not a .tar or .tar.gz archive: {HINT}")
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
        # "images" too, for older versions sharing the cache: they read that key
        (scratch / MANIFEST).write_text(json.dumps({MANIFEST_KEY: expected, "images": expected}))
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

    children = [f for f in folders if f.parent == top and f != top and _is_listed(f.name)]
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
        if path.parent.parent in splits and _is_listed(path.parent.name) and _is_image(path.name)
    )


def _cache_is_complete(folder: Path) -> bool:
    """Whether an extracted archive still holds every image its manifest counts: training on a
    cache that lost files would silently train on fewer images than the archive holds. Caches
    without an archive-counted manifest (made by older versions) count as incomplete."""
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
    root = _split_root(folder)
    if root is None:
        return 0
    return sum(len(_list_images(root / split)[1]) for split in ("train", "test"))


def _split_root(path: Path) -> Path | None:
    """``path`` itself if it holds train/ and test/, or its only sub-folder that does."""

    def has_splits(p: Path) -> bool:
        return (p / "train").is_dir() and (p / "test").is_dir()

    if has_splits(path):
        return path
    children = [c for c in path.iterdir() if c.is_dir() and _is_listed(c.name)]
    if len(children) == 1 and has_splits(children[0]):
        return children[0]
    return None


def _find_split_root(path: Path) -> Path:
    """As :func:`_split_root`, but a folder without train/ and test/ is an error saying so."""
    root = _split_root(path)
    if root is not None:
        return root
    if not any(path.iterdir()):
        raise DataError(f"data folder {path} is empty: {HINT}")
    raise DataError(
        f"{path} has no train/ and test/ folders: expected {path}/train/<class>/*.jpg and "
        f"{path}/test/<class>/*.jpg"
    )


def _image_folder_pair(root: Path) -> tuple[ImageSet, ImageSet]:
    train, test = (read_image_folder(root / split) for split in ("train", "test"))
    if train.classes != test.classes:
        raise DataError(
            f"train and test classes differ under {root}: train has {list(train.classes)}, "
            f"test has {list(test.classes)}"
        )
    return train, test


def read_image_folder(folder: Path) -> ImageSet:
    """Decode ``folder/<class>/*`` (classes in sorted order, as torchvision's ImageFolder).

    A corrupt or truncated image, or a class folder without images, stops the load with its
    name: silently training on fewer images (or classes) than the data set holds would make the
    reported numbers wrong.
    """
    classes, files = _list_images(folder)
    if not files:
        raise DataError(f"no images found in {folder}: expected {folder}/<class>/*.jpg")
    found = {label for _, label in files}
    empty = [folder / name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise DataFileError(
            f"class folder {empty[0]} has no images: add its images, or remove the class from "
            "train/ and test/",
            str(empty[0]),
            "is a class folder with no images",
        )
    arrays = [_read_image(path) for path, _ in files]
    for (path, _), array in zip(files, arrays):
        if array.shape != arrays[0].shape:
            height, width = arrays[0].shape[:2]
            problem = (
                f"is {array.shape[1]}x{array.shape[0]} pixels, the other images {width}x{height}"
            )
            raise DataFileError(
                f"{path} {problem}: all images in a set must have one size", str(path), problem
            )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images, labels, tuple(classes))


def _list_images(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names under ``folder`` (sorted, as torchvision's ImageFolder) and the image
    files in them with their labels."""
    classes = sorted(c.name for c in folder.iterdir() if c.is_dir() and _is_listed(c.name))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if _is_image(path.name)
    ]
    return classes, files


def _is_listed(folder_name: str) -> bool:
    """Whether a folder counts as a class (or the data set's root): hidden ones do not."""
    return not folder_name.startswith(".")


def _is_image(file_name: str) -> bool:
    """Whether a file in a class folder is loaded as an image (by its suffix, as ImageFolder)."""
    return PurePosixPath(file_name).suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataFileError(
            f"cannot read image {path} ({error}): delete or replace it",
            str(path),
            "is not a readable image (corrupt or truncated)",
        ) from error


def balanced_subset(dataset: ImageSet, size: int | None, seed: int) -> ImageSet:
    """A random subset of ``size`` images with the classes as equal as possible."""
    if size is None or size == len(dataset):
        return dataset
    if size > len(dataset):
        raise DataError(f"asked for {size} images but the set has only {len(dataset)}")
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(dataset.classes)
    per_class = [size // num_classes + (c < size % num_classes) for c in range(num_classes)]
    chosen = []
    for label, count in enumerate(per_class):
        members = torch.nonzero(dataset.labels == label).flatten()
        if count > len(members):
            raise DataError(
                f"class {dataset.classes[label]!r} has {len(members)} images, "
                f"a balanced subset of {size} needs {count}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    indices = torch.cat(chosen)
    return dataset.subset(indices[torch.randperm(len(indices), generator=generator)])


def synthetic_cifar10(
    train_size: int = 512, test_size: int = 256, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """A tiny stand-in for CIFAR-10: each class a fixed coloured pattern plus noise.

    Learnable in one epoch, needs no disk or network: for smoke runs and tests only.
    """
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(10, 3, 4, 4, generator=generator) * 200 + 28
    patterns = torch.nn.functional.interpolate(patterns, size=IMAGE_SIZE, mode="nearest")

    def make(size: int) -> ImageSet:
        labels = torch.arange(size) % 10
        labels = labels[torch.randperm(size, generator=generator)]
        noise = torch.randn(size, 3, *IMAGE_SIZE, generator=generator) * 40
        images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, CIFAR10_CLASSES)

    return make(train_size), make(test_size)
