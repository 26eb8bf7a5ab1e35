"""The device loader against torchvision's PIL pipeline: the same augmentations, the same floats."""

from __future__ import annotations

import collections
import logging
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from eva_utils import loaders
from eva_utils.config import Config
from eva_utils.data import CIFAR10_MEAN, CIFAR10_STD, ImageSet, balanced_subset, synthetic_cifar10
from eva_utils.loaders import DeviceLoader, pil_transform, rotate, torchvision_loader

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}  # DeviceLoader output = the pixel values
CLASSES = ("only",)


def marked_image() -> torch.Tensor:
    """(3, 32, 32) uint8: channel 0 is row + 1, channel 1 is column + 1, channel 2 is 255, so
    every pixel of a crop says where it came from and zero padding is told apart."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33).view(1, 32).expand(32, 32)
    return torch.stack([rows, cols, torch.full((32, 32), 255)]).to(torch.uint8)


def crop_outcomes(images: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of each 32x32 crop (padding 4) of the marked image, read from two
    pixels that all 81 offsets keep. ``images`` is uint8 (N, 3, 32, 32)."""
    row = images[:, 0, 16, 16].long() - 1
    col = images[:, 1, 16, 16].long() - 1
    flipped = images[:, 1, 16, 17].long() - 1 < col
    top = row - 16 + 4
    left = torch.where(flipped, col + 16 - 31, col - 16) + 4
    return list(zip(top.tolist(), left.tolist(), flipped.tolist()))


def to_pixels(normalised: torch.Tensor) -> torch.Tensor:
    """Undo ToTensor + Normalize(CIFAR-10): float (..., C, H, W) -> uint8 pixel values."""
    mean = torch.tensor(CIFAR10_MEAN).view(-1, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(-1, 1, 1)
    return ((normalised * std + mean) * 255).round().to(torch.uint8)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """DeviceLoader output with the ``RAW`` statistics -> uint8 pixel values."""
    return images.round().to(torch.uint8)


def copies(image: torch.Tensor, n: int) -> ImageSet:
    return ImageSet(image.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), CLASSES)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *size), generator=generator, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 10, tuple(str(c) for c in range(10)))


def test_crops_and_flips_cover_the_same_outcomes_as_torchvision():
    draws = 81 * 2 * 30
    marked = marked_image()
    loader = DeviceLoader(
        copies(marked, draws),
        draws,
        augment=("crop", "flip"),
        generator=torch.Generator().manual_seed(0),
        **RAW,
    )
    images, _ = next(iter(loader))
    device_counts = collections.Counter(crop_outcomes(as_pixels(images)))

    torch.manual_seed(0)
    transform = pil_transform(train=True, augment=("crop", "flip"))
    pil = to_pil(marked)
    pil_images = torch.stack([transform(pil) for _ in range(draws)])
    torchvision_counts = collections.Counter(crop_outcomes(to_pixels(pil_images)))

    every_outcome = {(top, left, flip) for top in range(9) for left in range(9) for flip in (0, 1)}
    assert set(torchvision_counts) == every_outcome
    assert set(device_counts) == every_outcome
    expected = draws / len(every_outcome)
    for counts in (device_counts, torchvision_counts):
        # Pearson's chi-squared against the uniform distribution: 161 degrees of freedom, mean
        # 161, standard deviation 18; 240 is exceeded with probability below 1e-4.
        chi_squared = sum((count - expected) ** 2 / expected for count in counts.values())
        assert chi_squared < 240


def test_each_crop_and_flip_is_torchvisions_at_its_offset():
    marked = marked_image()
    loader = DeviceLoader(
        copies(marked, 300),
        300, augment=("crop", "flip"), generator=torch.Generator().manual_seed(1), **RAW,
    )  # fmt: skip
    images, _ = next(iter(loader))
    padded = TF.pad(to_pil(marked), 4, fill=0)  # what RandomCrop(32, padding=4) crops from
    pixels = as_pixels(images)
    for image, (top, left, flipped) in zip(pixels, crop_outcomes(pixels)):
        expected = TF.crop(padded, top, left, 32, 32)
        if flipped:
            expected = TF.hflip(expected)
        torch.testing.assert_close(image, TF.pil_to_tensor(expected), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("degrees", [-8.0, -2.5, 0.0, 3.0, 7.9, 30.0])
def test_rotate_matches_torchvision_for_a_given_angle(size, degrees):
    image = random_images(1, seed=3, size=size).images
    expected = np.asarray(
        TF.rotate(to_pil(image[0]), degrees, interpolation=TF.InterpolationMode.NEAREST, fill=0)
    )
    rotated = rotate(image.float(), torch.tensor([degrees]))[0].permute(1, 2, 0).numpy()
    # Nearest-neighbour ties could round either way; in practice no pixel differs.
    assert (rotated != expected).any(axis=2).mean() <= 0.01


def test_random_rotation_stays_within_degrees_and_matches_torchvision(monkeypatch):
    drawn = []

    def recording_rotate(images, angles):
        drawn.append(angles)
        return rotate(images, angles)

    monkeypatch.setattr(loaders, "rotate", recording_rotate)
    dataset = random_images(500, seed=4)
    loader = DeviceLoader(
        dataset, 500, augment=("rotate",), rotate_degrees=8.0,
        generator=torch.Generator().manual_seed(0), **RAW,
    )  # fmt: skip
    images, _ = next(iter(loader))
    angles = torch.cat(drawn)
    assert angles.abs().max() <= 8.0
    assert angles.min() < -7.5 and angles.max() > 7.5  # the whole range is used
    assert abs(angles.mean()) < 0.5  # uniform on [-8, 8]: the mean's standard error is 0.2
    for index in range(0, 500, 50):
        expected = TF.rotate(
            to_pil(dataset.images[index]), float(angles[index]),
            interpolation=TF.InterpolationMode.NEAREST, fill=0,
        )  # fmt: skip
        got = as_pixels(images[index]).permute(1, 2, 0).numpy()
        assert (got != np.asarray(expected)).any(axis=2).mean() <= 0.01


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalisation_equals_totensor_and_normalize(channels_last):
    dataset = random_images(20, seed=5)
    images, _ = next(iter(DeviceLoader(dataset, 20, channels_last=channels_last)))
    transform = pil_transform(train=False)
    expected = torch.stack([transform(to_pil(image)) for image in dataset.images])
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert images.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_test_batches_equal_the_pil_pipeline_exactly(channels_last):
    _, test_set = synthetic_cifar10(16, 600)
    device_batches = list(DeviceLoader(test_set, 512, channels_last=channels_last))
    pil_batches = list(torchvision_loader(test_set, 512, train=False, num_workers=0))
    assert [len(labels) for _, labels in device_batches] == [512, 88]
    assert len(device_batches) == len(pil_batches)
    for (images, labels), (pil_images, pil_labels) in zip(device_batches, pil_batches):
        torch.testing.assert_close(images, pil_images, rtol=0, atol=0)
        torch.testing.assert_close(labels, pil_labels, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dataset",
    [
        synthetic_cifar10(70, 10)[0],
        balanced_subset(synthetic_cifar10(200, 10)[0], 37, seed=2),
        random_images(30, size=(24, 40)),
    ],
    ids=["synthetic", "subset", "non-square"],
)
def test_device_loader_serves_any_image_set_once_per_epoch(dataset):
    ids = ImageSet(dataset.images, torch.arange(len(dataset)), dataset.classes)
    loader = DeviceLoader(
        ids, 16, shuffle=True, augment=("crop", "flip", "rotate"),
        generator=torch.Generator().manual_seed(0), channels_last=True,
    )  # fmt: skip
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(dataset) // 16)
    for images, labels in batches:
        assert images.shape == (len(labels), *dataset.images.shape[1:])
        assert images.dtype == torch.float32
    served = torch.cat([labels for _, labels in batches])
    assert sorted(served.tolist()) == list(range(len(dataset)))  # every image exactly once


def test_the_same_generator_seed_gives_the_same_batches():
    dataset, _ = synthetic_cifar10(64, 10)

    def epoch(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(
            dataset, 32, shuffle=True, augment=("crop", "flip", "rotate"),
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return [images for images, _ in loader]

    first, again, other = epoch(0), epoch(0), epoch(1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


def test_more_workers_than_cores_start_one_per_core_with_a_one_line_note(caplog):
    """num_workers 64 on a machine of few cores: 64 processes would only queue for the cores,
    each with its own copy of the data set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    train_set, test_set = synthetic_cifar10(8, 8)
    config = Config(loader="torchvision", num_workers=cores + 62, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="eva_utils"):
        train, test = loaders.build_loaders(
            config, train_set, test_set, torch.device("cpu"), torch.Generator().manual_seed(0)
        )
    assert train.loader.num_workers == test.loader.num_workers == cores
    notes = [record.getMessage() for record in caplog.records]
    assert notes == [f"num_workers {cores + 62} is more than the {cores} CPU cores this process "
                     f"may use: starting {cores} DataLoader workers"]  # fmt: skip
