"""Data sources: a tiny ImageFolder and .tar.gz written by the test, subsets, constants."""

from __future__ import annotations

import pytest
import torch

from eva_utils.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    balanced_subset,
    extract_archive,
    load_cifar10,
    synthetic_cifar10,
)

from .conftest import TINY_CLASSES


def test_image_folder_loads_as_uint8_tensors_with_sorted_classes(tiny_folder):
    train, test = load_cifar10(tiny_folder)
    assert train.classes == test.classes == tuple(sorted(TINY_CLASSES))
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.class_counts() == [4, 4, 4] and test.class_counts() == [2, 2, 2]
    # class index i was drawn with grey level 40 + 60 * i (see conftest): labels follow folders
    means = [train.images[train.labels == i].float().mean().item() for i in range(3)]
    assert means == sorted(means)


def test_folder_holding_one_split_folder_is_accepted(tmp_path, tiny_folder):
    """The CIFAR-10 archive extracts to cifar10-jpg/train, cifar10-jpg/test."""
    train, _ = load_cifar10(tiny_folder.parent)
    assert len(train) == 12


def test_archive_is_extracted_once_and_decoded_the_same(tiny_archive, tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    first = extract_archive(tiny_archive, cache)
    marker = first / "marker"
    marker.touch()
    assert extract_archive(tiny_archive, cache) == first and marker.exists()
    assert [p for p in cache.iterdir() if p.name.startswith(".")] == []  # no scratch left
    from_archive, _ = load_cifar10(tiny_archive, cache_dir=cache)
    from_folder, _ = load_cifar10(tiny_folder)
    assert torch.equal(from_archive.images, from_folder.images)
    assert torch.equal(from_archive.labels, from_folder.labels)


def test_balanced_subset_is_class_balanced_and_seeded():
    train, _ = synthetic_cifar10(1000, 10)
    subset = balanced_subset(train, 250, seed=3)
    assert len(subset) == 250
    assert sorted(subset.class_counts()) == [25] * 10
    again = balanced_subset(train, 250, seed=3)
    other = balanced_subset(train, 250, seed=4)
    assert torch.equal(subset.images, again.images)
    assert not torch.equal(subset.images, other.images)


def test_balanced_subset_spreads_the_remainder():
    train, _ = synthetic_cifar10(1000, 10)
    assert sorted(balanced_subset(train, 23, seed=0).class_counts()) == [2] * 7 + [3] * 3


def test_cifar10_constants_are_the_data_set_statistics():
    """Not pytorch-cifar's (0.2023, 0.1994, 0.2010), which are means of per-image stds."""
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_real_cifar10_matches_the_published_statistics(real_cifar10):
    train, test = real_cifar10
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.class_counts() == [5000] * 10
    pixels = train.images[::10].float() / 255
    mean = pixels.mean((0, 2, 3))
    std = pixels.std((0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(CIFAR10_MEAN), atol=0.003, rtol=0)
    torch.testing.assert_close(std, torch.tensor(CIFAR10_STD), atol=0.003, rtol=0)


@pytest.mark.parametrize("size", [0, -5])
def test_subset_of_non_positive_size_is_rejected_by_config(size):
    from eva_utils.config import Config
    from eva_utils.errors import ConfigError

    with pytest.raises(ConfigError, match="train_size"):
        Config(train_size=size)
