"""The trained model's release asset (``tools/release_asset.py``) and its download: built from a
made-up checkpoint, served from a local URL (``file://`` or an HTTP server on 127.0.0.1) into a
temporary torch.hub cache. Offline: no test reaches the repository's real release."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from eva_utils import notebook, pretrained, runfolder
from eva_utils.config import get_preset
from eva_utils.data import CIFAR10_CLASSES
from eva_utils.errors import CheckpointError
from eva_utils.recipe import build_model

from .conftest import ROOT, cli_env

REFERENCE_BEST = ROOT.parent / "shared" / "reference-runs" / "session8-h100" / "best.pt"
CONFIG = get_preset("session8").replace(data="synthetic", device="cpu")
RELEASE_ASSET = ROOT / "tools" / "release_asset.py"


def load_script(path: Path) -> ModuleType:
    """The script at ``path`` as a module (``tools/`` is no package; sys.path is left alone)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release_asset = load_script(RELEASE_ASSET)


def write_best(folder: Path, model: dict[str, torch.Tensor]) -> Path:
    """A run folder whose best.pt holds ``model`` as an eva8 checkpoint (made-up numbers)."""
    state = {
        "config": CONFIG.to_dict(),
        "classes": list(CIFAR10_CLASSES),
        "model": model,
        "epoch": 3,
        "test_acc": 0.5,
    }
    runfolder.save_checkpoint(state, folder / runfolder.BEST)
    return folder / runfolder.BEST


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A few tensors of the kinds a state dict holds; no value is exact in fp16."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64).float(),
        "bn1.running_var": torch.rand(4, generator=generator) + 0.1,
        "bn1.num_batches_tracked": torch.tensor(391),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache for this test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch" / "hub"


@pytest.fixture
def asset(tmp_path) -> Path:
    return release_asset.write_asset(
        write_best(tmp_path / "run", tiny_weights()), tmp_path / "dist"
    )


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving the folder."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def misbehaving_server(asset) -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 that, for ``/silent``, accepts the request and
    never answers; for ``/partway``, sends the headers and half of the asset, then nothing; for
    ``/trickle``, sends the asset in six pieces a quarter of a second apart; for ``/loop``,
    redirects to itself. The silent ones wait until the test ends."""
    body = asset.read_bytes()
    test_over = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path in ("/partway", "/trickle"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
            if self.path == "/partway":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
            if self.path == "/trickle":
                piece = -(-len(body) // 6)
                for start in range(0, len(body), piece):
                    self.wfile.write(body[start : start + piece])
                    self.wfile.flush()
                    time.sleep(0.25)
                return
            test_over.wait(60)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    test_over.set()
    server.shutdown()
    server.server_close()


def finishes_within(seconds: float, call: Callable[[], Any]) -> Any:
    """What ``call()`` returns or raises, run in a thread; fails the test (instead of hanging
    it) if it has not finished after ``seconds``."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def cached_files(hub: Path) -> list[Path]:
    return [path for path in hub.rglob("*") if path.is_file()]


def damage(path: Path) -> None:
    """Flip 16 bytes in the middle of the file ``path``."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    path.write_bytes(bytes(data))


# --- the asset ---------------------------------------------------------------------------------


def test_asset_holds_the_weights_in_fp16_and_the_rest_unchanged(tmp_path, asset):
    original = runfolder.load_checkpoint(tmp_path / "run" / runfolder.BEST)
    stored = runfolder.load_checkpoint(asset)
    assert {k: v for k, v in stored.items() if k != "model"} == {
        k: v for k, v in original.items() if k != "model"
    }
    for name, tensor in original["model"].items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert stored["model"][name].dtype == expected.dtype, name
        torch.testing.assert_close(stored["model"][name], expected, rtol=0, atol=0)


def test_asset_name_carries_its_sha256_prefix(asset):
    digest = pretrained.file_sha256(asset)
    assert asset.name == pretrained.asset_name(digest) == f"eva8-session8-h100-{digest[:8]}.pt"


def test_asset_is_byte_for_byte_reproducible(tmp_path, asset):
    again = release_asset.write_asset(tmp_path / "run" / runfolder.BEST, tmp_path / "again")
    assert again.name == asset.name
    assert again.read_bytes() == asset.read_bytes()


def test_a_weight_beyond_fp16_is_refused(tmp_path):
    best = write_best(tmp_path / "run", {"linear.weight": torch.tensor([1.0, 70000.0])})
    with pytest.raises(CheckpointError, match="linear.weight does not fit in fp16"):
        release_asset.write_asset(best, tmp_path / "dist")


@pytest.mark.skipif(not REFERENCE_BEST.is_file(), reason=f"no reference run at {REFERENCE_BEST}")
def test_pinned_sha256_is_what_make_release_asset_writes(tmp_path):
    """The published asset is the reference run's best.pt in fp16, written by this code (with
    this torch's file format: after a torch upgrade, a failure here means a new asset)."""
    asset = release_asset.write_asset(REFERENCE_BEST, tmp_path)
    assert pretrained.file_sha256(asset) == pretrained.SHA256
    assert asset.name == pretrained.asset_name()


def test_release_asset_tool_writes_the_asset_and_prints_its_sha256(tmp_path):
    """``make release-asset`` runs the script as a file, outside the package."""
    best = write_best(tmp_path / "run", tiny_weights())
    command = [sys.executable, str(RELEASE_ASSET), str(best), "--out", str(tmp_path / "dist")]
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (asset,) = (tmp_path / "dist").iterdir()
    digest = pretrained.file_sha256(asset)
    assert f"{asset}: 0.0 MB, sha256 {digest} (NOT the pinned SHA256)" in done.stdout
    assert f"attach it to the release {pretrained.RELEASE_TAG} as {asset.name}" in done.stdout


# --- the address -------------------------------------------------------------------------------


def test_release_url_is_a_release_asset_of_the_repository_in_pyproject(monkeypatch):
    monkeypatch.delenv(pretrained.URL_ENV, raising=False)
    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert pretrained.release_url() == (
        f"{repository['Repository']}/releases/download/{pretrained.RELEASE_TAG}/"
        f"eva8-session8-h100-{pretrained.SHA256[:8]}.pt"
    )


def test_environment_variable_replaces_the_address(monkeypatch):
    monkeypatch.setenv(pretrained.URL_ENV, "https://mirror.example/eva8.pt")
    assert pretrained.release_url() == "https://mirror.example/eva8.pt"


# --- the download ------------------------------------------------------------------------------


def test_download_gives_the_fp16_rounded_weights_in_the_hub_cache(hub, asset):
    sha256 = pretrained.file_sha256(asset)
    folder = pretrained.download(asset.as_uri(), sha256, progress=False)
    assert folder == hub / "checkpoints" / asset.stem
    downloaded = runfolder.load_checkpoint(folder / runfolder.BEST)["model"]
    for name, tensor in tiny_weights().items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(downloaded[name], expected, rtol=0, atol=0)


def test_download_over_http(hub, asset, http_root):
    root, base = http_root
    (root / asset.name).write_bytes(asset.read_bytes())
    folder = pretrained.download(f"{base}/{asset.name}", pretrained.file_sha256(asset), False)
    assert (folder / runfolder.BEST).read_bytes() == asset.read_bytes()


def test_second_download_is_served_from_the_cache(hub, asset, tmp_path):
    sha256 = pretrained.file_sha256(asset)
    first = pretrained.download(asset.as_uri(), sha256, progress=False)
    nowhere = (tmp_path / "no-such-asset.pt").as_uri()  # a download would fail
    assert pretrained.download(nowhere, sha256, progress=False) == first


def test_a_damaged_cached_file_is_downloaded_again(hub, asset):
    sha256 = pretrained.file_sha256(asset)
    folder = pretrained.download(asset.as_uri(), sha256, progress=False)
    damage(folder / runfolder.BEST)
    assert pretrained.download(asset.as_uri(), sha256, progress=False) == folder
    assert (folder / runfolder.BEST).read_bytes() == asset.read_bytes()


def test_a_damaged_cached_file_is_refused_in_one_line_when_no_download_can_replace_it(
    hub, asset, tmp_path
):
    sha256 = pretrained.file_sha256(asset)
    folder = pretrained.download(asset.as_uri(), sha256, progress=False)
    damage(folder / runfolder.BEST)
    nowhere = (tmp_path / "no-such-asset.pt").as_uri()
    with pytest.raises(CheckpointError) as error:
        pretrained.download(nowhere, sha256, progress=False)
    message = str(error.value)
    assert str(folder / runfolder.BEST) in message and "sha256" in message
    assert f"could not download the trained model from {nowhere} (" in message
    assert "\n" not in message
    assert cached_files(hub) == []


def test_wrong_checksum_is_refused_in_one_line_and_nothing_is_cached(hub, asset):
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as error:
        pretrained.download(asset.as_uri(), wrong, progress=False)
    assert "is not the published trained model" in str(error.value)
    assert "\n" not in str(error.value)
    assert cached_files(hub) == []
    assert not (hub / "checkpoints" / Path(pretrained.asset_name(wrong)).stem).exists()


@pytest.mark.parametrize(
    "where", ["missing file", "http 404", "closed port", "no scheme", "redirect loop"]
)
def test_unreachable_url_gives_one_line(hub, tmp_path, http_root, misbehaving_server, where):
    url = {
        "missing file": (tmp_path / "no-such-asset.pt").as_uri(),
        "http 404": f"{http_root[1]}/no-such-asset.pt",
        "closed port": "http://127.0.0.1:9/no-such-asset.pt",  # discard: nothing listens
        "no scheme": str(tmp_path / "no-such-asset.pt"),
        "redirect loop": f"{misbehaving_server}/loop",
    }[where]
    with pytest.raises(CheckpointError) as error:
        pretrained.download(url, "0" * 64, progress=False)
    message = str(error.value)
    assert message.startswith(f"could not download the trained model from {url} (")
    assert pretrained.URL_ENV in message and "\n" not in message
    assert cached_files(hub) == []


@pytest.mark.parametrize("server", ["never answers", "stops partway"])
def test_a_silent_server_ends_the_download_in_one_line(
    hub, asset, misbehaving_server, monkeypatch, server
):
    monkeypatch.setattr(pretrained, "TIMEOUT_SECONDS", 1.0, raising=False)
    url = misbehaving_server + {"never answers": "/silent", "stops partway": "/partway"}[server]
    sha256 = pretrained.file_sha256(asset)
    error = finishes_within(10, lambda: pretrained.download(url, sha256, progress=False))
    assert isinstance(error, CheckpointError), error
    message = str(error)
    assert message.startswith(f"could not download the trained model from {url} (")
    assert "1 s" in message and "\n" not in message
    assert cached_files(hub) == []


def test_a_slow_download_that_keeps_moving_is_not_cut_off(
    hub, asset, misbehaving_server, monkeypatch
):
    """The timeout is for silence, not for the whole download: six pieces 0.25 s apart take
    longer than the 1 s timeout, and none is late."""
    monkeypatch.setattr(pretrained, "TIMEOUT_SECONDS", 1.0, raising=False)
    url = f"{misbehaving_server}/trickle"
    start = time.monotonic()
    sha256 = pretrained.file_sha256(asset)
    folder = finishes_within(10, lambda: pretrained.download(url, sha256, progress=False))
    assert time.monotonic() - start > 1.0
    assert (folder / runfolder.BEST).read_bytes() == asset.read_bytes()


def test_a_killed_download_leaves_nothing_once_the_next_one_runs(hub, asset, misbehaving_server):
    """kill -9 skips every clean-up: the next download removes the dead process's scratch."""
    sha256 = pretrained.file_sha256(asset)
    code = (
        "from eva_utils import pretrained; "
        f"pretrained.download({misbehaving_server + '/partway'!r}, {sha256!r}, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not cached_files(hub) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None and cached_files(hub), "the child wrote no scratch"
    finally:
        child.kill()
        child.wait()
    folder = pretrained.download(asset.as_uri(), sha256, progress=False)
    assert cached_files(hub) == [folder / runfolder.BEST]


def test_the_partial_file_of_an_earlier_version_is_removed(hub, asset):
    """Versions that downloaded with torch.hub left ``<asset>.<uuid4 hex>.partial`` files."""
    partial = hub / "checkpoints" / f"{asset.name}.0123456789abcdef0123456789abcdef.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(asset.read_bytes()[:100])
    folder = pretrained.download(asset.as_uri(), pretrained.file_sha256(asset), progress=False)
    assert cached_files(hub) == [folder / runfolder.BEST]


@pytest.mark.parametrize("problem", ["a file in its place", "read-only", "a size limit"])
def test_an_unwritable_cache_is_named_instead_of_the_network(hub, asset, problem):
    """A read-only or full cache folder is said to be one, not a network problem. A full
    disk is stood in for by a file size limit (EFBIG where a full disk gives ENOSPC)."""
    cache = hub / "checkpoints"
    sha256 = pretrained.file_sha256(asset)
    download = functools.partial(pretrained.download, asset.as_uri(), sha256, progress=False)
    if problem == "a file in its place":
        hub.parent.mkdir(parents=True)
        hub.write_text("not a folder")
        error = pytest.raises(CheckpointError, download).value
    elif problem == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache.mkdir(parents=True)
        cache.chmod(0o555)
        try:
            error = pytest.raises(CheckpointError, download).value
        finally:
            cache.chmod(0o755)
    else:
        resource = pytest.importorskip("resource", reason="no file size limits (not POSIX)")
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        # past the limit a write fails with EFBIG, instead of the signal ending this process
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (asset.stat().st_size // 2, limits[1]))
        try:
            error = pytest.raises(CheckpointError, download).value
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
    message = str(error)
    assert str(cache) in message and "\n" not in message
    assert "network" not in message and pretrained.URL_ENV not in message
    assert hub.is_file() or cached_files(hub) == []


# --- the notebooks -----------------------------------------------------------------------------


@pytest.fixture
def no_local_reference(tmp_path, monkeypatch):
    """No local best.pt of the reference run, no smoke mode."""
    monkeypatch.setenv(notebook.REFERENCE_ENV, str(tmp_path / "no-such-run"))
    monkeypatch.delenv(notebook.SMOKE_ENV, raising=False)


def test_notebook_uses_the_download_when_no_local_copy_exists(
    hub, tmp_path, monkeypatch, capsys, no_local_reference
):
    """The notebook's model is the download, read back into fp32: the fp16-rounded weights."""
    model = build_model(CONFIG, len(CIFAR10_CLASSES)).state_dict()
    asset = release_asset.write_asset(write_best(tmp_path / "reference", model), tmp_path / "dist")
    monkeypatch.setenv(pretrained.URL_ENV, asset.as_uri())
    monkeypatch.setattr(pretrained, "SHA256", pretrained.file_sha256(asset))
    trained = notebook.trained_or_untrained()
    out = capsys.readouterr().out
    assert "the reference run's trained ResNet18" in out
    # described from the record of the run it was published from, results/session8-h100
    assert "the published model of results/session8-h100" in out
    assert "30 epochs on NVIDIA H100 80GB HBM3" in out
    assert trained.folder == hub / "checkpoints" / asset.stem
    loaded = trained.model.state_dict()
    assert not torch.equal(model["conv1.weight"], model["conv1.weight"].half().float())
    for name, tensor in model.items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(loaded[name], expected, rtol=0, atol=0)


def test_notebook_falls_back_when_the_download_fails(
    hub, tmp_path, monkeypatch, capsys, no_local_reference
):
    url = (tmp_path / "no-such-asset.pt").as_uri()
    monkeypatch.setenv(pretrained.URL_ENV, url)
    trained = notebook.trained_or_untrained()
    missing, failure, model_line = capsys.readouterr().out.splitlines()
    assert missing.startswith(f"{notebook.REFERENCE_ENV}=") and "does not exist" in missing
    assert failure.startswith(f"could not download the trained model from {url}")
    assert model_line.startswith("model: an UNTRAINED session8 ResNet18")
    assert trained.epoch == 0


def test_smoke_mode_downloads_nothing(hub, asset, monkeypatch, no_local_reference):
    monkeypatch.setenv(notebook.SMOKE_ENV, "1")
    monkeypatch.setenv(pretrained.URL_ENV, asset.as_uri())
    monkeypatch.setattr(pretrained, "SHA256", pretrained.file_sha256(asset))
    assert notebook.reference_checkpoint() is None
    assert cached_files(hub) == []


def write_reference_run(folder: Path, epochs: int, device_name: str) -> Path:
    """A run folder with a best.pt and a metrics.json of ``epochs`` epochs on ``device_name``."""
    write_best(folder, build_model(CONFIG, len(CIFAR10_CLASSES)).state_dict())
    history = [dict(epoch=e, train_loss=2.0, train_acc=0.2, test_loss=2.0, test_acc=0.2 + e / 100,
                    lr=0.01, seconds=1.0) for e in range(1, epochs + 1)]  # fmt: skip
    environment = {"device": "cuda", "device_name": device_name}
    runfolder.write_metrics(folder / runfolder.METRICS, CONFIG, history, environment)
    return folder


def test_a_reference_run_is_described_by_its_own_epochs_and_hardware(
    tmp_path, monkeypatch, capsys, no_local_reference
):
    """A run given as the reference (a student's own, say) is not called 30 epochs on an H100."""
    folder = write_reference_run(tmp_path / "mine", epochs=2, device_name="Tesla T4")
    monkeypatch.setenv(notebook.REFERENCE_ENV, str(folder))
    trained = notebook.trained_or_untrained()
    out = capsys.readouterr().out
    assert out.startswith("model: the reference run's trained ResNet18") and out.count("\n") == 1
    assert "(mine: session8 recipe, 2 epochs on Tesla T4; best epoch 3, 50.00%)" in out
    assert "H100" not in out and trained.epoch == 3


@pytest.mark.parametrize("helper", ["trained_or_untrained", "gallery_model"])
def test_a_truncated_reference_model_falls_back_with_a_hint(
    helper, tmp_path, monkeypatch, capsys, no_local_reference
):
    """A best.pt cut short is said in one line with what to do, and the notebook goes on with
    what it uses when there is no reference model: an untrained model, or the notebook's run."""
    folder = write_reference_run(tmp_path / "copy", epochs=2, device_name="Tesla T4")
    best = folder / runfolder.BEST
    best.write_bytes(best.read_bytes()[:1000])
    own = write_reference_run(tmp_path / "own", epochs=1, device_name="cpu")
    monkeypatch.setenv(notebook.REFERENCE_ENV, str(folder))
    if helper == "gallery_model":
        trained = notebook.gallery_model(own, CONFIG.replace(data="cifar10.tar.gz"))
    else:
        trained = notebook.trained_or_untrained()
    hint, model_line, *rest = capsys.readouterr().out.splitlines()
    assert hint.startswith(f"{best} is not a readable checkpoint") and "delete it" in hint
    assert trained.epoch == (3 if helper == "gallery_model" else 0)
    assert trained.folder == (own if helper == "gallery_model" else None)
    expected = f"the best epoch (3) of {own}" if helper == "gallery_model" else "an UNTRAINED"
    assert model_line.startswith(f"model: {expected}")
    assert [line.split(":")[0] for line in rest] == (
        ["not the trained reference model"] if helper == "gallery_model" else []
    )


@pytest.mark.parametrize("smoke", [True, False], ids=["smoke", "download"])
def test_a_missing_reference_run_path_is_said_before_anything_else(
    smoke, hub, tmp_path, monkeypatch, capsys, no_local_reference
):
    """EVA_REFERENCE_RUN naming no best.pt is said in one line, with what happens instead."""
    if smoke:
        monkeypatch.setenv(notebook.SMOKE_ENV, "1")
    monkeypatch.setenv(pretrained.URL_ENV, (tmp_path / "no-such-asset.pt").as_uri())
    assert notebook.reference_checkpoint() is None
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{notebook.REFERENCE_ENV}={tmp_path / 'no-such-run'} does not exist")
    assert ("no reference model in smoke mode" if smoke else "downloading it") in first
