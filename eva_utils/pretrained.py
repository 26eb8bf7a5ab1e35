"""The reference run's trained model for every student, downloaded the way torchvision's weights
are: a release asset of the repository, checked by its full sha256, cached in torch.hub's folder.

The asset is the reference run's ``best.pt`` (``results/session8-h100``) with its weights stored
in fp16, half the size of the fp32 file; they are read back into the fp32 model, and the test
accuracy in fp32 evaluation is unchanged (87.87% on the 10,000 test images, 2 predictions
differ; the README says how it was measured). Its address is
``<Repository>/releases/download/<RELEASE_TAG>/<asset name>``, with ``Repository`` taken from
the installed package's metadata (``[project.urls]`` in ``pyproject.toml``), so a fork that
publishes the same asset downloads from itself. ``EVA_PRETRAINED_URL`` replaces the whole
address: a mirror, a local copy (``file:///path/to/asset.pt``), the tests; the sha256 stays
:data:`SHA256`, so only the published file is accepted.

The download lands in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``) as a run folder named like the asset, with the sha256 prefix
that names torchvision's files: ``eva8-session8-h100-<sha256[:8]>/best.pt``, which
``analysis.load_trained_model(download())`` reads. A second call finds it there and downloads
nothing. A server that stops answering for :data:`TIMEOUT_SECONDS` (to connect, or between two
reads) ends the download in one line; a slow one that keeps sending does not.

``make release-asset`` (``tools/release_asset.py``, a maintainer's tool outside the package)
writes the asset from a checkpoint and prints its size and sha256: byte for byte the same file
on every run (with the same torch version), so :data:`SHA256` is that digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import torch

from .errors import CheckpointError
from .files import atomic_write, remove_dead_scratch
from .progress import redraws, tqdm
from .runfolder import BEST

DISTRIBUTION = "eva8"  # the package whose metadata names the repository
RELEASE_TAG = "session8-h100"
ASSET_STEM = "eva8-session8-h100"
# sha256 of the asset that `make release-asset` writes from
# ../shared/reference-runs/session8-h100/best.pt (torch 2.14).
SHA256 = "d43e003f03e93a21da61f237c94ad19c085d3f7013256265548997f07f765617"
URL_ENV = "EVA_PRETRAINED_URL"
TIMEOUT_SECONDS = 30.0  # to connect, and then for each read: a server silent this long fails
READ_BYTES = 1 << 16  # each read: the progress bar moves every 64 KiB


def asset_name(sha256: str = SHA256) -> str:
    """The asset's file name: the run's name and, as torchvision's, its sha256 prefix."""
    return f"{ASSET_STEM}-{sha256[:8]}.pt"


def repository() -> str:
    """The repository address in the installed package's metadata (``[project.urls]``)."""
    try:
        urls = importlib.metadata.metadata(DISTRIBUTION).get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the {DISTRIBUTION} package is not installed, so the repository to download the "
            f"trained model from is unknown: pip install -e . in the clone, or set {URL_ENV}"
        ) from None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip() == "Repository":
            return url.strip().removesuffix("/")
    raise CheckpointError(
        f"the {DISTRIBUTION} package names no Repository in [project.urls]: set {URL_ENV}"
    )


def release_url() -> str:
    """Where the asset is published: ``$EVA_PRETRAINED_URL``, else the repository's release."""
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    return f"{repository()}/releases/download/{RELEASE_TAG}/{asset_name()}"


def download(url: str | None = None, sha256: str | None = None, progress: bool = True) -> Path:
    """The run folder, in torch.hub's cache, whose ``best.pt`` is the asset at ``url`` (default
    :func:`release_url`) with this ``sha256`` (default :data:`SHA256`): downloaded if it is not
    there yet, and kept only if its full sha256 matches; a cached copy is checked again on every
    call, and replaced if it differs. A server silent for :data:`TIMEOUT_SECONDS` ends the
    download. Raises CheckpointError, in one line, if it cannot be."""
    sha256 = sha256 or SHA256
    folder = cache_folder(sha256)
    best = folder / BEST
    cached = best.is_file()
    if cached and file_sha256(best) == sha256:  # about 0.02 s for the 22 MB asset
        return folder
    url = url or release_url()
    try:
        _download(url, best, sha256, progress, damaged=cached)
    except CheckpointError as error:
        if cached:  # but changed since it was downloaded
            removed = "" if best.exists() else " and was removed"
            raise CheckpointError(f"{best} failed its sha256 check{removed}; {error}") from None
        raise
    return folder


def cache_folder(sha256: str | None = None) -> Path:
    """The run folder in torch.hub's cache that :func:`download` fills with the asset of this
    ``sha256`` (default :data:`SHA256`)."""
    stem = Path(asset_name(sha256 or SHA256)).stem
    return Path(torch.hub.get_dir()) / "checkpoints" / stem


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, best: Path, sha256: str, progress: bool, damaged: bool) -> None:
    """Download ``url`` into ``best`` (a run folder in the cache) if its sha256 is ``sha256``;
    else raise CheckpointError and keep nothing. A ``damaged`` ``best`` is removed first."""
    folder = best.parent
    try:
        if damaged:  # it goes, whether or not a download replaces it
            best.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        # what killed downloads left: their scratch (.best.pt.XXXX.<pid>.tmp), and the .partial
        # files of earlier versions (torch.hub.download_url_to_file's, beside the folder)
        remove_dead_scratch(folder, prefix=f".{BEST}.")
        for partial in folder.parent.glob(f"{folder.name}.pt.*.partial"):
            partial.unlink(missing_ok=True)
        # the scratch file is removed if anything fails
        atomic_write(best, lambda file: _fetch(url, file, sha256, progress))
    except OSError as error:  # the cache's: _fetch turned the network's into CheckpointError
        raise CheckpointError(
            f"cannot write the trained model into {folder.parent} ({error.strerror or error}): "
            "make room or make it writable there, or set TORCH_HOME to another folder"
        ) from None
    finally:
        if not best.is_file():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a failed download keeps nothing


def _fetch(url: str, file: IO[bytes], sha256: str, progress: bool) -> None:
    """Copy the body at ``url`` into ``file``; raises CheckpointError if it cannot be read, or
    if its sha256 differs from ``sha256``. Only ``file`` raises OSError."""
    digest = hashlib.sha256()
    # the timeout bounds the connection and every read: a slow download goes on, a silent one
    # raises TimeoutError
    with _reading(url, sha256):  # a malformed URL fails in Request
        request = Request(url, headers={"User-Agent": DISTRIBUTION})
        response = urlopen(request, timeout=TIMEOUT_SECONDS)
    length = response.headers.get("Content-Length", "")
    total = int(length) if length.isdigit() else None
    shown = progress and redraws()
    bar = tqdm(total=total, disable=not shown, unit="B", unit_scale=True, unit_divisor=1024)
    with response, bar:
        while True:
            with _reading(url, sha256):
                block = response.read(READ_BYTES)
            if not block:
                break
            file.write(block)
            digest.update(block)
            bar.update(len(block))
    if digest.hexdigest() != sha256:
        raise CheckpointError(
            f"{url} is not the published trained model (its sha256 differs from "
            f"{sha256[:8]}...): nothing was kept; check {URL_ENV} or the release's asset"
        )


@contextlib.contextmanager
def _reading(url: str, sha256: str) -> Iterator[None]:
    """Turn a failure to read from ``url`` into CheckpointError, in one line naming it."""
    try:
        yield
    except (OSError, ValueError, http.client.HTTPException) as error:
        # "HTTP Error 404: Not Found"; a URLError's reason, without its "<urlopen error>"
        reason = error if isinstance(error, HTTPError) else getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            reason = f"nothing received for {TIMEOUT_SECONDS:g} s"
        reason = " ".join(str(reason).split())  # a redirect loop's HTTPError has three lines
        raise CheckpointError(
            f"could not download the trained model from {url} ({reason}): check the network, "
            f"or set {URL_ENV} to a copy of {asset_name(sha256)}"
        ) from None
