"""Run folders: atomic checkpoints and metrics, exact resume, and interruption handling.

A run folder holds ``last.pt`` (model, optimizer, scheduler, gradient scaler, every RNG state,
history and config: enough to resume exactly), ``best.pt`` (the best epoch's weights) and
``metrics.json``. Every file is written to a temporary name, flushed and renamed, so a crash at
any moment leaves the previous complete file, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision

from .config import Config
from .errors import CheckpointError, Interrupted

if TYPE_CHECKING:
    from .engine import Run

FORMAT = "eva8-checkpoint"
METRICS_FORMAT = "eva8-metrics"
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.json"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    _atomic_write(Path(path), lambda file: torch.save(obj, file))


def atomic_write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(Path(path), lambda file: file.write(text.encode()))


def environment(device: torch.device) -> dict[str, str]:
    """Versions and hardware, recorded in metrics.json beside the numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or device.type
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": name,
    }


def _cpu_name() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return None


# --- RNG state ---------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


# --- run folders -------------------------------------------------------------------------------


def prepare_run_folder(out: Path) -> None:
    """Create ``out`` for a new run; refuse to overwrite a run that could be resumed."""
    if (out / LAST).exists():
        raise CheckpointError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)


def save(run: Run, out: Path) -> None:
    """Write last.pt, best.pt (if this epoch is the best) and metrics.json, each atomically."""
    history = run.history
    atomic_save(
        {
            "format": FORMAT,
            "config": run.config.to_dict(),
            "classes": list(run.classes),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(run.generator),
            "history": history,
        },
        out / LAST,
    )
    if history[-1]["test_acc"] >= max(row["test_acc"] for row in history):
        atomic_save(
            {
                "format": FORMAT,
                "config": run.config.to_dict(),
                "classes": list(run.classes),
                "model": run.model.state_dict(),
                "epoch": history[-1]["epoch"],
                "test_acc": history[-1]["test_acc"],
            },
            out / BEST,
        )
    write_metrics(out / METRICS, run.config, history, environment(run.device))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an eva8 checkpoint (weights only: nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first, or check the run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises many kinds
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({error.__class__.__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an eva8 checkpoint")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path | str) -> None:
    """Load a checkpoint's weights, with a one-line error if the architecture differs."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(
            f"{path} holds weights of another architecture "
            f"({state['config'].get('arch')}, {len(state['classes'])} classes)"
        ) from None


def restore(run: Run, out: Path) -> None:
    """Put ``run`` back in the state ``out/last.pt`` recorded after its last finished epoch."""
    path = out / LAST
    if not path.exists():
        raise CheckpointError(
            f"{out} has no checkpoint ({LAST}) to resume: start a new run with --out"
        )
    state = load_checkpoint(path)
    load_weights(run.model, state, path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], run.generator)
    run.history = list(state["history"])


def resume_config(out: Path, **changes: Any) -> Config:
    """The config a run folder was started with, with ``changes`` (e.g. more epochs)."""
    state = load_checkpoint(out / LAST) if (out / LAST).exists() else None
    if state is None:
        raise CheckpointError(
            f"{out} has no checkpoint ({LAST}) to resume: start a new run with --out"
        )
    return Config.from_dict(state["config"]).replace(**changes)


def write_metrics(path: Path, config: Config, history: list[dict], env: dict[str, str]) -> None:
    atomic_write_json(
        {
            "format": METRICS_FORMAT,
            "config": config.to_dict(),
            "environment": env,
            "history": history,
        },
        path,
    )


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read and check a metrics.json written by eva8."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: give the metrics.json of a run") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}): is it a metrics.json?"
        ) from None
    history = metrics.get("history") if isinstance(metrics, dict) else None
    if (
        not isinstance(history, list)
        or not history
        or not all(isinstance(row, dict) and set(HISTORY_KEYS) <= row.keys() for row in history)
    ):
        raise CheckpointError(
            f"{path} is not an eva8 metrics.json (expected a 'history' list of epochs with "
            f"{', '.join(HISTORY_KEYS)})"
        )
    return metrics


def describe_run(metrics: dict[str, Any]) -> str:
    """One line naming a run: preset-like recipe, data, epochs and hardware."""
    config, env = metrics.get("config", {}), metrics.get("environment", {})
    sizes = "/".join(
        f"{config.get(k):,}" if config.get(k) else "all" for k in ("train_size", "test_size")
    )
    source = Path(config["data"]).name if config.get("data") else "CIFAR-10"
    return (
        f"{config.get('arch', '?')} {config.get('norm', '?')}, {len(metrics['history'])} epochs, "
        f"{sizes} train/test images of {source}, {env.get('device_name', '?')}"
    )


# --- interruption ------------------------------------------------------------------------------


@contextlib.contextmanager
def interruptible(out: Path | None, current_epoch: Callable[[], int]) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into :class:`Interrupted`, which says how to resume."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        epoch = current_epoch()
        if out is None or not (out / LAST).exists():
            raise Interrupted(
                f"stopped in epoch {epoch}; no epoch had finished, nothing to resume"
            ) from None
        raise Interrupted(
            f"stopped in epoch {epoch}; {out / LAST} holds epochs 1-{epoch - 1}: "
            f"resume with: python -m eva_utils train --resume {out}"
        ) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
