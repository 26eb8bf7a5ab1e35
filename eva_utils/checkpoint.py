"""Run folders: atomic checkpoints and metrics, exact resume, and interruption handling.

A run folder holds ``last.pt`` (model, optimizer, scheduler, gradient scaler, every RNG state,
history and config: enough to resume exactly), ``best.pt`` (the best epoch's weights) and
``metrics.json``. Every file is written to a temporary name, flushed and renamed, so a crash at
any moment leaves the previous complete file, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import math
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

from .config import RESUMABLE_CHANGES, Config, divergence_advice
from .errors import CheckpointError, Interrupted, TrainingDiverged

if TYPE_CHECKING:
    from .engine import Run

FORMAT = "eva8-checkpoint"
METRICS_FORMAT = "eva8-metrics"
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.json"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (``.last.pt.*.tmp``...).

    A SIGKILL or power cut during :func:`atomic_save` skips its clean-up. The finished files are
    never touched. Returns the paths removed.
    """
    removed = []
    for name in (LAST, BEST, METRICS):
        for path in Path(folder).glob(f"{_temporary_prefix(name)}*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


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


def check_output_folder(folder: Path, flag: str = "--out") -> None:
    """Check, before any work whose results would go into ``folder``, that they can be written
    there: the folder, or its nearest existing ancestor, is a writable folder. Creates nothing.
    Raises CheckpointError naming the folder and the cause."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents, Path.cwd()) if path.exists())
    if not existing.is_dir():
        raise CheckpointError(f"{existing} is a file, not a folder: choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".eva8-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(
            f"cannot write into {existing} ({error.strerror or error}): choose a writable folder "
            f"with {flag}"
        ) from None


def check_new_run_folder(out: Path) -> None:
    """Refuse to start a new run where one that could be resumed already is, or where nothing
    can be written."""
    if (out / LAST).exists():
        raise CheckpointError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    check_output_folder(out)


def check_resumable_folder(out: Path) -> None:
    """Refuse to resume from ``out`` when it has no checkpoint or cannot take a new one."""
    if not (out / LAST).exists():
        raise CheckpointError(
            f"{out} has no checkpoint ({LAST}) to resume: start a new run with --out"
        )
    check_output_folder(out, "--resume")


def prepare_run_folder(out: Path) -> None:
    """Create ``out`` for a new run; refuse to overwrite a run that could be resumed."""
    check_new_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has finished, then raise KeyboardInterrupt.

    Around checkpoint writes: an interrupt inside ``torch.save`` surfaces as a RuntimeError
    from its zip writer instead of a KeyboardInterrupt, so the write is let finish (it takes a
    fraction of a second) and the interrupt is handled after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda s, frame: caught.append(s)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise KeyboardInterrupt


def save(run: Run, out: Path) -> None:
    """Write best.pt (if this epoch is the best), metrics.json and last.pt, each atomically.

    last.pt goes last: it is what a resume starts from, so a crash between the writes makes the
    resumed run redo this epoch (exactly) and rewrite the other two. A diverged epoch (test loss
    NaN or infinite) raises :class:`TrainingDiverged` and overwrites nothing; a write that fails
    (disk full, read-only folder) raises CheckpointError and leaves the files it would replace.
    Ctrl-C and SIGTERM wait until the writes are done.
    """
    history = run.history
    if not math.isfinite(history[-1]["test_loss"]):
        raise TrainingDiverged(
            f"the test loss became NaN or infinite after epoch {history[-1]['epoch']} "
            f"(the weights diverged in its last steps): {divergence_advice(run.config)}"
        )
    try:
        with signals_deferred():
            _write_run(run, out)
    except OSError as error:
        raise CheckpointError(
            f"could not save epoch {history[-1]['epoch']} into {out} "
            f"({error.strerror or error}); the files of the epochs before are kept: free space "
            f"or make the folder writable, then python -m eva_utils train --resume {out}"
        ) from None


def _write_run(run: Run, out: Path) -> None:
    history = run.history
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
    expected, given = model.state_dict(), state["model"]
    unexpected = [name for name in given if name not in expected]
    missing = [name for name in expected if name not in given]
    reshaped = [
        name for name in expected if name in given and expected[name].shape != given[name].shape
    ]
    if unexpected or missing or reshaped:
        first = (unexpected or missing or reshaped)[0]
        raise CheckpointError(
            f"{path} holds weights of another architecture than this model "
            f"({len(unexpected)} unexpected, {len(missing)} missing and {len(reshaped)} "
            f"differently shaped tensors, e.g. {first}); its config says "
            f"{state['config'].get('arch')} with {len(state['classes'])} classes"
        )
    model.load_state_dict(given)


def restore(run: Run, out: Path, state: dict[str, Any] | None = None) -> None:
    """Put ``run`` back in the state ``out/last.pt`` recorded after its last finished epoch
    (``state``: that file, if the caller has already read it with :func:`load_resumable`).

    On the CPU the resumed run repeats the uninterrupted one exactly. One run has one recipe:
    a config that differs from the checkpoint's in any field but
    :data:`~eva_utils.config.RESUMABLE_CHANGES` is refused.
    """
    path = out / LAST
    state = state if state is not None else load_resumable(out)
    remove_stale_temporaries(out)
    saved = Config.from_dict(state["config"])
    _check_resumable(run, saved, state, out)
    load_weights(run.model, state, path)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without a gradient scaler (CPU, bf16)
            run.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], run.generator)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} cannot be resumed with these settings ({error})") from None
    run.history = list(state["history"])


def _check_resumable(run: Run, saved: Config, state: dict[str, Any], out: Path) -> None:
    check_same_recipe(saved, run.config, out)
    if list(state["classes"]) != list(run.classes):
        raise CheckpointError(
            f"{out} was trained on the classes {list(state['classes'])}, the data now has "
            f"{list(run.classes)}: resume with the run's own data (--data)"
        )
    if run.config.schedule == "onecycle":
        saved_steps = state["scheduler"].get("total_steps")
        if saved_steps != run.scheduler.total_steps:
            raise CheckpointError(
                f"{out} follows a onecycle schedule of {saved_steps} steps ({saved.epochs} "
                f"epochs); these settings need {run.scheduler.total_steps}: a onecycle run "
                "cannot be lengthened or re-batched, so keep --epochs, --batch-size, "
                "--train-size and --max-batches, or start a new run with --out"
            )


def check_same_recipe(saved: Config, config: Config, out: Path) -> None:
    """Refuse to resume the run in ``out``, started with ``saved``, with a ``config`` that
    differs in any field but :data:`~eva_utils.config.RESUMABLE_CHANGES`."""
    changed = ", ".join(
        f"--{name.replace('_', '-')} {_flag_value(old)} -> {_flag_value(new)}"
        for (name, old), (_, new) in zip(saved.items(), config.items())
        if name not in RESUMABLE_CHANGES and old != new
    )
    if changed:
        raise CheckpointError(
            f"cannot resume {out} with another recipe ({changed}): a run keeps the recipe it "
            "started with; drop those flags, or start a new run with --out"
        )


def _flag_value(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def load_resumable(out: Path) -> dict[str, Any]:
    """``out/last.pt``, after checking that the run in ``out`` can be resumed there."""
    check_resumable_folder(out)
    return load_checkpoint(out / LAST)


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
    except OSError as error:  # a folder, no permission...
        raise CheckpointError(f"cannot read {path} ({error.strerror}): is it a file?") from None
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
    for row in history:
        for key in HISTORY_KEYS:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CheckpointError(
                    f"{path}: {key} of epoch {row['epoch']!r} is {value!r}, not a number: the "
                    "file was edited or damaged; use the metrics.json that training wrote"
                )
    return metrics


def describe_data(config: dict[str, Any]) -> tuple[str, str]:
    """(data source name, "train/test" image counts) of a run's config, for captions and tables."""
    sizes = "/".join(
        f"{config.get(k):,}" if config.get(k) else "all" for k in ("train_size", "test_size")
    )
    source = Path(config["data"]).name if config.get("data") else "CIFAR-10 (torchvision)"
    return source, sizes


def describe_run(metrics: dict[str, Any]) -> str:
    """One line naming a run: preset-like recipe, data, epochs and hardware."""
    config, env = metrics.get("config", {}), metrics.get("environment", {})
    source, sizes = describe_data(config)
    return (
        f"{config.get('arch', '?')} {config.get('norm', '?')}, {len(metrics['history'])} epochs, "
        f"{sizes} train/test images of {source}, {env.get('device_name', '?')}"
    )


# --- interruption ------------------------------------------------------------------------------


@contextlib.contextmanager
def interruptible(out: Path | None, current_epoch: Callable[[], int]) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into :class:`Interrupted`, which says how to resume; when
    training diverges, add what the run folder still holds to the error."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        if out is None:
            raise Interrupted(
                f"stopped in epoch {current_epoch()}; without a run folder (out=...) there is "
                "nothing to resume"
            ) from None
        # Count the epochs last.pt really holds: the signal may have come during its write.
        saved = saved_epochs(out)
        if not saved:
            raise Interrupted(
                "stopped in epoch 1; no epoch had finished, nothing to resume"
            ) from None
        raise Interrupted(
            f"stopped in epoch {saved + 1}; {out / LAST} holds epochs 1-{saved}: "
            f"resume with: python -m eva_utils train --resume {out}"
        ) from None
    except TrainingDiverged as error:
        saved = saved_epochs(out) if out is not None else 0
        if not saved:
            raise
        raise TrainingDiverged(
            f"{error}, in a new run (a run keeps its recipe); {out / LAST} keeps epochs "
            f"1-{saved}, the last good ones"
        ) from error
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def saved_epochs(out: Path) -> int:
    """How many epochs ``out/last.pt`` holds (0 if none or unreadable)."""
    try:
        return len(load_checkpoint(out / LAST)["history"])
    except CheckpointError:
        return 0
