"""CIFAR-10 as in-memory uint8 tensors, from torchvision's download, a local folder or archive.

Every source ends as an :class:`ImageSet`: ``images`` (N, 3, H, W) uint8 and ``labels`` (N,)
int64 on the CPU, plus the class names. Loaders (``loaders.py``) turn an ImageSet into batches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel statistics of the CIFAR-10 training set. pytorch-cifar's often copied std
# (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the data set's std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm"}
SYNTHETIC = "synthetic"
HINT = "pass --data PATH (an ImageFolder with train/ and test/, or a .tar.gz of one)"


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
        return _decoded_archive(extract_archive(path, cache_dir))
    return _image_folder_pair(_find_split_root(path))


def _decoded_archive(folder: Path) -> tuple[ImageSet, ImageSet]:
    """Decode an extracted archive once and keep the tensors beside it (60,000 JPEGs take
    about 10 s to decode, the saved tensors well under one)."""
    decoded = folder / ".decoded.pt"
    if decoded.is_file():
        state = torch.load(decoded, weights_only=True)
        return tuple(ImageSet(s["images"], s["labels"], tuple(s["classes"])) for s in state)
    sets = _image_folder_pair(_find_split_root(folder))
    scratch = decoded.with_suffix(f".{os.getpid()}.tmp")
    torch.save(
        [{"images": s.images, "labels": s.labels, "classes": list(s.classes)} for s in sets],
        scratch,
    )
    os.replace(scratch, decoded)
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
    return Path(os.environ.get("EVA8_CACHE", Path.home() / ".cache" / "eva8"))


def extract_archive(archive: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract a .tar(.gz) once into the cache; later calls return the same folder at once."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    name = archive.name.split(".")[0]
    target = Path(cache_dir or default_cache_dir()) / f"{name}-{key.hexdigest()[:12]}"
    if target.is_dir():
        return target
    if not tarfile.is_tarfile(archive):
        raise DataError(f"{archive} is not a .tar or .tar.gz archive: {HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside the target and rename, so an interrupted extraction is never mistaken
    # for a finished one.
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        scratch.rename(target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(
            f"could not extract {archive} ({error}): is it a complete download?"
        ) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _find_split_root(path: Path) -> Path:
    """``path`` itself if it holds train/ and test/, or its only sub-folder that does."""

    def has_splits(p: Path) -> bool:
        return (p / "train").is_dir() and (p / "test").is_dir()

    if has_splits(path):
        return path
    children = [c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1 and has_splits(children[0]):
        return children[0]
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

    A corrupt or truncated image stops the load with its file name: silently training on fewer
    images than the data set holds would make the reported numbers wrong.
    """
    classes = sorted(c.name for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"no images found in {folder}: expected {folder}/<class>/*.jpg")
    arrays = [_read_image(path) for path, _ in files]
    for (path, _), array in zip(files, arrays):
        if array.shape != arrays[0].shape:
            height, width = arrays[0].shape[:2]
            raise DataError(
                f"{path} is {array.shape[1]}x{array.shape[0]} pixels, the other images "
                f"{width}x{height}: all images in a set must have one size"
            )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images, labels, tuple(classes))


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path} ({error}): delete or replace it") from error


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
    patterns = torch.nn.functional.interpolate(patterns, size=32, mode="nearest")

    def make(size: int) -> ImageSet:
        labels = torch.arange(size) % 10
        labels = labels[torch.randperm(size, generator=generator)]
        noise = torch.randn(size, 3, 32, 32, generator=generator) * 40
        images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, CIFAR10_CLASSES)

    return make(train_size), make(test_size)
