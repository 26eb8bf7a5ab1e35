"""Batches from an ImageSet: built on the training device, or by a torchvision DataLoader.

``DeviceLoader`` keeps the whole set as uint8 on the training device and crops, flips, rotates
and normalises a batch at a time there: no worker processes, no PIL, no per-image Python.
``torchvision_loader`` is the classic pipeline (PIL transforms in DataLoader workers), kept as the
plain reference; both draw augmentations from the same distributions.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import Config
from .data import CIFAR10_MEAN, CIFAR10_STD, ImageSet

log = logging.getLogger(__name__)

PADDING = 4  # RandomCrop(32, padding=4)
TEST_BATCH = 512  # evaluation batch: no gradients to keep, so larger than a training batch
Batch = tuple[Tensor, Tensor]


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad (B, C, H, W) images by ``padding`` and cut a random HxW window from each."""
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    top, left = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator).to(device)
    rows = (top + torch.arange(h, device=device))[:, :, None]
    cols = (left + torch.arange(w, device=device))[:, None, :]
    batch = torch.arange(b, device=device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)  # channels_last in memory


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each (B, C, H, W) image left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_rotate(images: Tensor, degrees: float, generator: torch.Generator) -> Tensor:
    """Rotate each float (B, C, H, W) image about its centre by an angle uniform in
    [-degrees, degrees], nearest-neighbour, filling with 0 (torchvision's RandomRotation)."""
    angles = (torch.rand(len(images), generator=generator) * 2 - 1) * degrees
    return rotate(images, angles)


def rotate(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate each float (B, C, H, W) image counter-clockwise about its centre by ``angles`` (B,)
    degrees, nearest-neighbour, filling with 0, as torchvision's ``rotate`` does."""
    b, _, h, w = images.shape
    radians = torch.deg2rad(angles.float().cpu())
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros(b)
    # affine_grid's coordinates run from -1 to 1 along each axis: the aspect ratio terms keep
    # the rotation rigid in pixels when H != W.
    theta = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(b, 2, 3)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class DeviceLoader:
    """Iterate over an ImageSet in (normalised float images, labels) batches on ``device``.

    The uint8 images are copied to ``device`` once. Random draws come from ``generator`` (a CPU
    generator: its state is what a checkpoint saves to resume the same sequence).
    """

    def __init__(
        self,
        dataset: ImageSet,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: Sequence[str] = (),
        rotate_degrees: float = 8.0,
        generator: torch.Generator | None = None,
        channels_last: bool = False,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = tuple(augment)
        self.rotate_degrees = rotate_degrees
        self.generator = generator or torch.Generator()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.transform(self.images[index]), self.labels[index]

    def transform(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> augmented, normalised float images."""
        if "crop" in self.augment:
            images = random_crop(images, PADDING, self.generator)
        if "flip" in self.augment:
            images = random_flip(images, self.generator)
        images = images.float()
        if "rotate" in self.augment:
            images = random_rotate(images, self.rotate_degrees, self.generator)
        # ToTensor's and Normalize's arithmetic, in their order: the same floats to the last bit
        # (a fused multiply-add is no faster next to the network and differs in the last bit).
        images = images.div(255).sub_(self.mean).div_(self.std)
        return images.contiguous(memory_format=self.memory_format)


def pil_transform(train: bool, augment: Sequence[str] = (), rotate_degrees: float = 8.0):
    """The torchvision (PIL) pipeline equivalent to ``DeviceLoader.transform``."""
    from torchvision import transforms as T

    steps = []
    if train and "crop" in augment:
        steps.append(T.RandomCrop(32, padding=PADDING))
    if train and "flip" in augment:
        steps.append(T.RandomHorizontalFlip())
    if train and "rotate" in augment:
        steps.append(T.RandomRotation(rotate_degrees))
    steps += [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    return T.Compose(steps)


class PILDataset(Dataset):
    """An ImageSet seen as PIL images through a torchvision transform."""

    def __init__(self, dataset: ImageSet, transform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.dataset.images[index].permute(1, 2, 0).numpy())
        return self.transform(image), int(self.dataset.labels[index])


def torchvision_loader(
    dataset: ImageSet,
    batch_size: int,
    *,
    train: bool,
    augment: Sequence[str] = (),
    rotate_degrees: float = 8.0,
    generator: torch.Generator | None = None,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """The classic DataLoader over PIL transforms (batches stay on the CPU)."""
    transform = pil_transform(train, augment, rotate_degrees)
    return DataLoader(
        PILDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=train,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def workers(asked: int, say: bool = True) -> int:
    """The DataLoader workers to start for ``num_workers=asked``: at most one per CPU core this
    process may use (more only wait for the cores, each with a copy of the data set), said in
    one line when fewer than asked (``say``: the training loader says it, the others do not)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and asked > cores:
        if not say:
            return cores
        log.warning(
            "num_workers %d is more than the %d CPU cores this process may use: starting %d "
            "DataLoader workers",
            asked, cores, cores,
        )  # fmt: skip
        return cores
    return asked


class Limited:
    """The first ``max_batches`` batches of ``loader`` (all of them when None): the dry-run
    knob. It stops before fetching batch ``max_batches + 1``, so no augmentation or shuffle is
    drawn for a batch that is never used."""

    def __init__(self, loader: Iterable[Batch], max_batches: int | None) -> None:
        self.loader = loader
        self.max_batches = max_batches

    def __len__(self) -> int:
        return min(len(self.loader), self.max_batches or len(self.loader))

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(self.loader, self.max_batches)


def build_loaders(
    config: Config,
    train_set: ImageSet,
    test_set: ImageSet,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[Limited, Limited]:
    """Training and test loaders of the kind the config names, cut to ``config.max_batches``."""
    if config.loader == "device":
        common = dict(device=device, channels_last=config.channels_last)
        train_loader = DeviceLoader(
            train_set, config.batch_size, shuffle=True, augment=config.augment,
            rotate_degrees=config.rotate_degrees, generator=generator, **common,
        )  # fmt: skip
    else:
        common = dict(num_workers=workers(config.num_workers), pin_memory=device.type == "cuda")
        train_loader = torchvision_loader(
            train_set, config.batch_size, train=True, augment=config.augment,
            rotate_degrees=config.rotate_degrees, generator=generator, **common,
        )  # fmt: skip
    return Limited(train_loader, config.max_batches), eval_loader(config, test_set, device)


def eval_loader(config: Config, dataset: ImageSet, device: torch.device) -> Limited:
    """A loader that reads ``dataset`` as the test set is read (in order, not augmented), of
    the kind the config names, cut to ``config.max_batches``: for the test set and the
    validation split."""
    if config.loader == "device":
        loader = DeviceLoader(
            dataset, TEST_BATCH, device=device, channels_last=config.channels_last
        )
    else:
        loader = torchvision_loader(
            dataset, TEST_BATCH, train=False, num_workers=workers(config.num_workers, say=False),
            pin_memory=device.type == "cuda",
        )  # fmt: skip
    return Limited(loader, config.max_batches)
