"""Data that would train wrongly or fail late is refused at load time with one line, and the
archive cache never differs from its archive: damaged copies are extracted again, scratch left by
killed processes is removed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from eva_utils.data import extract_archive, load_cifar10
from eva_utils.errors import DataError

from .conftest import cli_env, write_archive, write_image_folder

# 3 classes x (4 train + 2 test) images, as write_image_folder makes them
TINY_COUNTS = (12, 6)


def load_error(source: Path, cache: Path | None = None) -> str:
    """The message of the DataError that loading ``source`` raises; it must be one line."""
    with pytest.raises(DataError) as error:
        load_cifar10(source, cache_dir=cache)
    message = str(error.value)
    assert "\n" not in message
    return message


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped): certainly not alive."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- image size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", ["folder", "archive"])
def test_images_that_are_not_32x32_are_refused_at_load_time(packed, tmp_path):
    source = write_image_folder(tmp_path / "big", size=64)
    if packed == "archive":
        source = write_archive(source, tmp_path / "big.tar.gz")
    message = load_error(source, tmp_path / "cache")
    assert f"images in {source} are 64x64 pixels" in message
    assert "32x32" in message and "resize them" in message


# --- a corrupt image in an archive ---------------------------------------------------------------


def test_corrupt_image_in_an_archive_names_the_member_and_the_archive(tmp_path):
    data = write_image_folder(tmp_path / "tiny")
    (data / "train" / "dog" / "0002.png").write_bytes(b"not an image at all")
    archive = write_archive(data, tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    message = load_error(archive, cache)
    assert f"tiny/train/dog/0002.png in {archive}" in message
    assert "re-download the archive" in message
    assert str(cache) not in message  # the extracted copy is not the user's to repair


# --- a cache that differs from its archive --------------------------------------------------------


@pytest.mark.parametrize("damage", ["files", "decoded", "no-manifest"])
def test_cache_missing_an_image_is_extracted_again(damage, tmp_path):
    """files: an image deleted from the cache before it was decoded; decoded: the decoded tensors
    made after an image was deleted; no-manifest: a cache made by an older version."""
    data = write_image_folder(tmp_path / "tiny")
    archive = write_archive(data, tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    folder = extract_archive(archive, cache)
    if damage == "decoded":
        load_cifar10(archive, cache_dir=cache)
    (folder / "tiny" / "train" / "cat" / "0001.png").unlink()
    if damage == "decoded":  # as older versions decoded the cache after the file was deleted
        fewer = load_cifar10(folder / "tiny")
        torch.save([dict(images=s.images, labels=s.labels, classes=list(s.classes)) for s in fewer],
                   folder / ".decoded.pt")  # fmt: skip
    if damage == "no-manifest":
        (folder / ".manifest.json").unlink(missing_ok=True)
    train, test = load_cifar10(archive, cache_dir=cache)
    assert (len(train), len(test)) == TINY_COUNTS
    reference, _ = load_cifar10(data)
    assert torch.equal(train.images, reference.images)
    assert torch.equal(train.labels, reference.labels)
    assert load_cifar10(archive, cache_dir=cache)[0].class_counts() == [4, 4, 4]  # and it stays


def test_extraction_finished_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    """Two processes may find the same stale cache and both extract it again: the slower one's
    rename fails, as the folder exists, and it uses the other's copy instead of failing."""
    data = write_image_folder(tmp_path / "tiny")
    archive = write_archive(data, tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    extractall = tarfile.TarFile.extractall

    def extract_while_another_process_does(self, *args, **kwargs):
        extractall(self, *args, **kwargs)
        monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
        extract_archive(archive, cache)  # the other process, faster

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_while_another_process_does)
    train, test = load_cifar10(archive, cache_dir=cache)
    assert (len(train), len(test)) == TINY_COUNTS
    assert hidden(cache) == []


# --- scratch left by killed processes -----------------------------------------------------------


def test_scratch_of_a_killed_extraction_is_removed_by_the_next(tmp_path):
    archive = write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    # os._exit skips every finally and except, as kill -9 does
    killed = (
        "import os, sys, tarfile\n"
        "from pathlib import Path\n"
        "from eva_utils.data import extract_archive\n"
        "tarfile.TarFile.extractall = lambda *args, **kwargs: os._exit(9)\n"
        "extract_archive(Path(sys.argv[1]), sys.argv[2])\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", killed, str(archive), str(cache)], env=cli_env(), timeout=120
    )
    assert child.returncode == 9 and len(hidden(cache)) == 1  # the scratch it left
    extract_archive(archive, cache)
    assert hidden(cache) == []


def test_extraction_removes_scratch_of_dead_processes_only(tmp_path):
    archive = write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    dead = cache / f".tiny-deadbeef.{dead_pid()}.tmp"
    alive = cache / f".tiny-cafebabe.{os.getpid()}.tmp"
    for scratch in (dead, alive):
        (scratch / "tiny" / "train").mkdir(parents=True)
    extract_archive(archive, cache)
    assert not dead.exists() and alive.is_dir()


def test_decoding_removes_scratch_of_dead_processes_only(tmp_path):
    archive = write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    folder = extract_archive(archive, cache)
    dead = folder / f".decoded.{dead_pid()}.tmp"
    # not this process: its own decode writes (and renames) .decoded.<its pid>.tmp
    alive = folder / f".decoded.{os.getppid()}.tmp"
    for scratch in (dead, alive):
        scratch.write_bytes(b"half a tensor file")
    load_cifar10(archive, cache_dir=cache)
    assert not dead.exists() and alive.is_file()


# --- an empty class folder -----------------------------------------------------------------------


@pytest.mark.parametrize("packed", ["folder", "archive"])
def test_empty_class_folder_is_refused_naming_it(packed, tmp_path):
    data = write_image_folder(tmp_path / "tiny")
    for image in (data / "train" / "cat").iterdir():
        image.unlink()
    if packed == "folder":
        message = load_error(data)
        assert str(data / "train" / "cat") in message
    else:
        archive = write_archive(data, tmp_path / "tiny.tar.gz")
        message = load_error(archive, tmp_path / "cache")
        assert f"tiny/train/cat in {archive}" in message
    assert "no images" in message


# --- an archive member outside its folder ---------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "kind", "link", "reason"),
    [
        ("../evil.txt", tarfile.REGTYPE, "", "leads outside the archive's folder"),
        ("tiny/../../evil.txt", tarfile.REGTYPE, "", "leads outside the archive's folder"),
        ("tiny/link", tarfile.SYMTYPE, "/etc/passwd", "leads outside the archive's folder"),
        ("tiny/link", tarfile.SYMTYPE, "../../evil.txt", "leads outside the archive's folder"),
        ("tiny/pipe", tarfile.FIFOTYPE, "", "is a device or other special file"),
    ],
    ids=["parent", "nested-parent", "absolute-link", "link-to-parent", "fifo"],
)
def test_unsafe_archive_member_is_refused_and_nothing_is_left(member, kind, link, reason, tmp_path):
    """A leading / is stripped by tarfile (the member lands inside), so absolute paths are
    tested through links."""
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the tiny data set plus one unsafe member
        tar.add(write_image_folder(tmp_path / "tiny"), arcname="tiny")
        info = tarfile.TarInfo(member)
        info.type, info.linkname = kind, link
        info.size = 4 if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    cache = tmp_path / "cache"
    message = load_error(archive, cache)
    assert f"{archive} holds {member!r}, which {reason}: the archive was not extracted" in message
    assert "use a trusted copy of the data set" in message and "complete download" not in message
    assert list(cache.iterdir()) == []  # no scratch, no half-extracted cache
    assert not (tmp_path / "evil.txt").exists()
