"""CIFAR-10 as in-memory uint8 tensors, from torchvision's download, a local folder or archive.

Every source ends as an :class:`ImageSet`: ``images`` (N, 3, H, W) uint8 and ``labels`` (N,)
int64 on the CPU, plus the class names. Loaders (``loaders.py``) turn an ImageSet into batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .archives import DECODED, extract_archive, list_images, split_root
from .config import SYNTHETIC, Config
from .errors import ConfigError, DataError, DataFileError, data_hint, option
from .files import atomic_write, remove_dead_scratch

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
        raise DataError(f"data path {path} does not exist: {data_hint()}")
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
            f"without a network, {data_hint()}"
        ) from error
    return tuple(
        ImageSet(
            torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(s.targets, dtype=torch.int64),
            tuple(s.classes),
        )
        for s in sets
    )


def _find_split_root(path: Path) -> Path:
    """As :func:`split_root`, but a folder without train/ and test/ is an error saying so."""
    root = split_root(path)
    if root is not None:
        return root
    if not any(path.iterdir()):
        raise DataError(f"data folder {path} is empty: {data_hint()}")
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
    classes, files = list_images(folder)
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
    return dataset.subset(balanced_indices(dataset, size, seed))


def balanced_indices(dataset: ImageSet, size: int, seed: int) -> Tensor:
    """The indices (in random order) of ``size`` images of ``dataset`` drawn from ``seed``, with
    the classes as equal as possible."""
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
    return indices[torch.randperm(len(indices), generator=generator)]


def split_validation(
    train_set: ImageSet, val_size: int | None, seed: int
) -> tuple[ImageSet, ImageSet | None]:
    """(the images to train on, the validation split): ``val_size`` class-balanced images of
    ``train_set``, drawn from ``seed`` as a ``train_size`` subset is, held out of the rest
    (which keeps its order). Without ``val_size``: (``train_set``, None)."""
    if val_size is None:
        return train_set, None
    if val_size >= len(train_set):  # the split must leave images to train on
        raise ConfigError(
            f"val_size ({val_size:,}) must be smaller than the {len(train_set):,} training "
            f"images it is held out of: lower {option('val_size')} (or raise "
            f"{option('train_size')})"
        )
    held_out = balanced_indices(train_set, val_size, seed)
    kept = torch.ones(len(train_set), dtype=torch.bool)
    kept[held_out] = False
    return train_set.subset(torch.nonzero(kept).flatten()), train_set.subset(held_out)


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


def check_out_of_data(out: str | os.PathLike, data: str | None) -> None:
    """Refuse a run folder ``out`` inside the data folder ``data``, before any folder is made:
    a run's folder among the data's would make the data unreadable ("no train/ and test/
    folders", or a class named after the run)."""
    if data is None or data == SYNTHETIC:
        return
    source = Path(data).expanduser().resolve()
    if not source.is_dir():  # an archive, or nothing yet: nothing to spoil
        return
    target = Path(out).expanduser().resolve()
    if target == source or source in target.parents:
        raise ConfigError(
            f"{option('out')} {out} is inside the data folder {data}: its folders would become "
            f"part of the data set; choose a run folder outside {data}"
        )


def load_datasets(config: Config) -> tuple[ImageSet, ImageSet]:
    """The config's data source, cut to the class-balanced subsets it asks for (the
    validation split, if any, is still in the training set: :func:`split_validation`)."""
    if config.data == SYNTHETIC:
        train_set, test_set = synthetic_cifar10(config.train_size or 512, config.test_size or 256)
    else:
        train_set, test_set = load_cifar10(config.data)
    return (
        balanced_subset(train_set, config.train_size, config.seed),
        balanced_subset(test_set, config.test_size, config.seed),
    )
