"""Data that would train wrongly or fail late is refused at load time with one line, and the
archive cache never differs from its archive: damaged copies are extracted again, scratch left by
killed processes is removed."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


# --- an extraction disturbed while it runs --------------------------------------------------------


def manifest_count(folder: Path) -> int:
    return json.loads((folder / ".manifest.json").read_text())["archive_images"]


@pytest.mark.parametrize("deleted", ["images", "scratch", "cache"])
def test_files_deleted_during_extraction_are_noticed_and_nothing_is_kept(
    deleted, tmp_path, monkeypatch
):
    """A cleaner deletes what was extracted so far when half the archive's members are out:
    the images (some of them), the scratch folder, or the whole cache folder. tarfile recreates
    the folders and extracts the rest, so only counting against the archive notices."""
    archive = write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    extractall = tarfile.TarFile.extractall

    def extract_with_a_cleaner(self, path, *args, filter, **kwargs):
        members = self.getmembers()

        def clean_midway(member, destination):
            if member is members[len(members) // 2]:
                if deleted == "images":
                    for image in sorted(Path(destination).rglob("*.png"))[::2]:
                        image.unlink()
                else:
                    shutil.rmtree(destination if deleted == "scratch" else cache)
            return tarfile.data_filter(member, destination)

        extractall(self, path, *args, filter=clean_midway, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_with_a_cleaner)
    message = load_error(archive, cache)
    assert f"files were deleted from {cache} while {archive} was extracted into it" in message
    assert f"of its {sum(TINY_COUNTS)} images are left" in message and "run again" in message
    assert not cache.exists() or list(cache.iterdir()) == []  # no scratch, no short cache
    monkeypatch.undo()  # the cleaner is gone: the next run extracts it whole
    train, test = load_cifar10(archive, cache_dir=cache)
    assert (len(train), len(test)) == TINY_COUNTS
    assert manifest_count(extract_archive(archive, cache)) == sum(TINY_COUNTS)


def test_cache_counted_from_survivors_by_an_older_version_is_extracted_again(tmp_path):
    """Older versions wrote the manifest from the images that reached the disk: a cache that
    lost files during its extraction had a manifest and decoded tensors that agreed on too few
    images, and every later run trained on them. Its manifest is not trusted."""
    data = write_image_folder(tmp_path / "tiny")
    archive = write_archive(data, tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    folder = extract_archive(archive, cache)
    (folder / "tiny" / "test" / "dog" / "0001.png").unlink()  # lost during the extraction
    survivors = load_cifar10(folder / "tiny")
    torch.save([dict(images=s.images, labels=s.labels, classes=list(s.classes)) for s in survivors],
               folder / ".decoded.pt")  # fmt: skip
    (folder / ".manifest.json").write_text(json.dumps({"images": sum(TINY_COUNTS) - 1}))
    train, test = load_cifar10(archive, cache_dir=cache)
    assert (len(train), len(test)) == TINY_COUNTS
    assert manifest_count(folder) == sum(TINY_COUNTS)


@pytest.mark.parametrize(
    "layout",
    ["plain", "dot-slash", "top-level", "hidden-and-other-files", "files-only"],
)
def test_archive_image_count_is_what_loading_decodes(layout, tmp_path):
    """The count taken from the archive's member list against the images loading finds on disk:
    a ./ prefix, train/ and test/ at the top, hidden folders, non-image files and archives
    without folder members."""
    data = write_image_folder(tmp_path / "tiny")
    if layout == "hidden-and-other-files":
        (data / "train" / "cat" / "notes.txt").write_text("not an image")
        (data / "train" / ".thumbnails").mkdir()  # a hidden folder is no class
        shutil.copy(data / "train" / "dog" / "0000.png", data / "train" / ".thumbnails")
        (data / "train" / "dog" / "0009.PNG").write_bytes(
            (data / "train/dog/0000.png").read_bytes()
        )
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if layout == "files-only":
            for image in sorted(data.rglob("*.png")):
                tar.add(image, arcname=f"tiny/{image.relative_to(data)}")
        else:
            arcname = {"dot-slash": "./tiny", "top-level": "."}.get(layout, "tiny")
            tar.add(data, arcname=arcname)
    folder = extract_archive(archive, tmp_path / "cache")
    train, test = load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert manifest_count(folder) == len(train) + len(test)
    assert len(train) + len(test) == sum(TINY_COUNTS) + (layout == "hidden-and-other-files")


# --- cache locations that cannot be used ----------------------------------------------------------


def refuse(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.fixture
def archive(tmp_path) -> Path:
    return write_archive(write_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_eva8_cache_that_is_or_is_under_a_file_is_one_line(where, archive, tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cache = a_file if where == "file" else a_file / "eva8"
    monkeypatch.setenv("EVA8_CACHE", str(cache))
    message = load_error(archive)
    assert f"the archive cache {cache} (from EVA8_CACHE)" in message
    if where == "file":
        assert "is a file, not a folder" in message
    else:
        assert f"cannot be made: {a_file} is a file, not a folder" in message
    assert message.endswith("set EVA8_CACHE to a writable folder")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_eva8_cache_that_cannot_be_written_is_one_line(code, archive, tmp_path, monkeypatch):
    """Tests run as root, who may write anywhere: the refusal is simulated where the scratch
    folder is made, as a read-only mount or a folder of another user refuses it."""
    monkeypatch.setenv("EVA8_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse(code))
    message = load_error(archive)
    assert f"cannot write into the archive cache {tmp_path / 'cache'} (from EVA8_CACHE)" in message
    assert f"({os.strerror(code)}): set EVA8_CACHE to a writable folder" in message


def test_an_unwritable_home_with_an_archive_is_one_line(archive, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EVA8_CACHE")
    mkdir = Path.mkdir

    def read_only_home(self, *args, **kwargs):
        if self.is_relative_to(home):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_home)
    message = load_error(archive)
    place = home / ".cache" / "eva8"
    assert f"cannot write into the archive cache {place} (Permission denied)" in message
    assert message.endswith("set EVA8_CACHE to a writable folder")


def test_a_full_disk_during_extraction_names_the_cache_not_the_archive(
    archive, tmp_path, monkeypatch
):
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse(errno.ENOSPC))
    message = load_error(archive, tmp_path / "cache")
    assert f"cannot write into the archive cache {tmp_path / 'cache'} (No space left" in message
    assert "pass a writable cache_dir" in message and "complete download" not in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_empty_eva8_cache_counts_as_unset(archive, tmp_path, monkeypatch):
    """EVA8_CACHE= once extracted CIFAR-10 (413 MB) into the working folder."""
    monkeypatch.setenv("EVA8_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = extract_archive(archive)
    assert folder.parent == tmp_path / "home" / ".cache" / "eva8"
    assert list(work.iterdir()) == []


# --- a run folder inside the data folder (issue 25 item 8) -------------------------------------


@pytest.mark.parametrize("inside", ["runs/r", "tiny/train/r", "."])
def test_out_inside_the_data_folder_is_refused_before_any_folder_is_made(inside, tmp_path, capsys):
    from eva_utils.cli import main

    data = tmp_path / "data"
    write_image_folder(data / "tiny", per_class=2)
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    code = main(["train", "--data", str(data), "--out", str(data / inside), "--quiet",
                 "--device", "cpu", "--epochs", "1"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"--out {data / inside} is inside the data folder {data}" in lines[0]
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before
    load_cifar10(data)  # the data still loads


def test_a_sweep_inside_the_data_folder_is_refused_before_planning(tmp_path):
    from eva_utils import get_preset
    from eva_utils.errors import ConfigError
    from eva_utils.sweeps import plan

    write_image_folder(tmp_path / "data" / "tiny", per_class=2)
    config = get_preset("session8").replace(data=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="is inside the data folder"):
        plan(config, {"dropout": [0.0]}, [1], tmp_path / "data" / "sweep")
