"""Training and evaluation: ``train`` and ``test`` run one epoch and return plain numbers;
``fit`` runs a whole :class:`~eva_utils.config.Config` and returns its history.

The fast path is on by default where it helps and each part can be switched off in the config:
channels_last, mixed precision (bf16 or fp16 with a gradient scaler where the hardware computes
them natively: :mod:`eva_utils.precision`), metrics accumulated on the device and read once per
epoch, batches built on the device, and optionally ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .config import Config, divergence_advice
from .data import ImageSet, balanced_subset, load_cifar10, synthetic_cifar10
from .errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from .loaders import DeviceLoader, torchvision_loader
from .model import ARCHITECTURES
from .precision import choose_precision
from .progress import bar, epoch_bar
from .runfolder import LAST, RunFolder, check_classes, load_weights
from .signals import sigterm_as_interrupt

LossFn = Callable[[Tensor, Tensor], Tensor]
REFRESH_EVERY = 20  # steps between progress-bar updates (each one reads the loss from the device)


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: cuda, then mps, then cpu. Anything else must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} cannot train here: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but CUDA is not available: use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
            "cuda:0 to cuda:N-1"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but MPS is not available: use --device cpu"
        )
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The mixed-precision dtype ``precision`` means on ``device``, or None for plain fp32."""
    return choose_precision(device, precision).dtype


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _to_device(batch: tuple[Tensor, Tensor], device: torch.device, channels_last: bool):
    images, labels = batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def batch_bar(
    loader: Iterable, *, max_batches: int | None = None, desc: str = "", progress: bool = True
) -> Iterator:
    """The first ``max_batches`` batches of ``loader`` (all when None) behind a progress bar.

    tqdm wraps one iterator, never the loader itself: ``tqdm.auto`` calls ``iter()`` on what it
    wraps when it is built and again when it is looped over, and each ``iter()`` of a DataLoader
    draws from its generator (a different shuffle than the plain loop's) and starts its workers.
    islice also stops before fetching batch ``max_batches + 1``.
    """
    total = min(len(loader), max_batches or math.inf) if hasattr(loader, "__len__") else None
    batches = itertools.islice(loader, max_batches)
    return bar(batches, total=total, desc=desc, progress=progress, leave=False)


class EpochMeter:
    """Loss and accuracy of an epoch, summed on the device: updating it never waits for the
    GPU; :meth:`check_finite` and :meth:`result` read it back (once per epoch, or per progress
    refresh)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.images = 0
        self.steps = 0

    def update(self, loss_sum: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``loss_sum`` is its loss summed over its images."""
        loss_sum = loss_sum.detach().float()
        self.loss_sum += loss_sum
        self.correct += (logits.argmax(1) == labels).sum()
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~loss_sum.isfinite(), self.steps, self.first_bad
        )
        self.images += len(labels)
        self.steps += 1

    def check_finite(self, desc: str) -> None:
        """Raise :class:`TrainingDiverged` naming the first batch whose loss was not finite."""
        step = int(self.first_bad)
        if step >= 0:
            raise TrainingDiverged(f"the loss became NaN or infinite in {desc}, step {step + 1}")

    @property
    def loss(self) -> float:
        return self.loss_sum.item() / max(self.images, 1)

    def result(self) -> dict[str, float]:
        """``{"loss": mean loss per image, "acc": fraction in [0, 1], "images": count}``."""
        return {
            "loss": self.loss,
            "acc": self.correct.item() / max(self.images, 1),
            "images": self.images,
        }


def train(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    loss_fn: LossFn = F.cross_entropy,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """One training epoch. ``scheduler``, if given, steps after every batch (e.g. OneCycleLR).

    Returns ``{"loss": mean loss per image, "acc": fraction in [0, 1], "images": count}``.
    Raises :class:`TrainingDiverged` naming the first step whose loss was not finite.
    """
    device = torch.device(device)
    model.train()
    meter = EpochMeter(device)
    batches = batch_bar(loader, max_batches=max_batches, desc=desc, progress=progress)
    for step, batch in enumerate(batches):
        images, labels = _to_device(batch, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        meter.update(loss * len(labels), logits, labels)
        if progress and step % REFRESH_EVERY == REFRESH_EVERY - 1:
            meter.check_finite(desc)
            batches.set_postfix(loss=f"{meter.loss:.3f}", refresh=False)
    meter.check_finite(desc)
    return meter.result()


@torch.no_grad()
def test(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str = "cpu",
    loss_fn: LossFn = F.cross_entropy,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta_flip: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "test",
) -> dict[str, float]:
    """Evaluate in eval mode. The loss is averaged over images, not batches.

    With ``tta_flip`` the logits are the mean of the image's and its mirror image's.
    Returns ``{"loss", "acc" (fraction in [0, 1]), "images"}``; the loss may be NaN (a diverged
    model): the caller decides what that means.
    """
    device = torch.device(device)
    model.eval()
    meter = EpochMeter(device)
    for batch in batch_bar(loader, max_batches=max_batches, desc=desc, progress=progress):
        images, labels = _to_device(batch, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images).float()
            if tta_flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        meter.update(loss_fn(logits, labels, reduction="sum"), logits, labels)
    return meter.result()


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], *, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(probabilities (N, classes), labels (N,)) on the CPU, in the loader's order, eval mode."""
    device = torch.device(device)
    model.eval()
    probs, targets = [], []
    for images, labels in loader:
        images, labels = _to_device((images, labels), device, False)
        probs.append(model(images).float().softmax(1).cpu())
        targets.append(labels.cpu())
    return torch.cat(probs), torch.cat(targets)


# --- building a run from a Config -------------------------------------------------------------


def load_datasets(config: Config) -> tuple[ImageSet, ImageSet]:
    """The config's data source, cut to the class-balanced subsets it asks for."""
    if config.data == "synthetic":
        train_set, test_set = synthetic_cifar10(config.train_size or 512, config.test_size or 256)
    else:
        train_set, test_set = load_cifar10(config.data)
    return (
        balanced_subset(train_set, config.train_size, config.seed),
        balanced_subset(test_set, config.test_size, config.seed),
    )


def build_model(config: Config, num_classes: int = 10) -> nn.Module:
    """The config's network (GBN and dropout included when the config says so)."""
    build = ARCHITECTURES[config.arch]
    return build(
        num_classes, norm=config.norm, num_splits=config.num_splits, dropout=config.dropout
    )


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD; with ``decay_norm_bias=False`` norm weights and biases (1-d tensors) get no decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.decay_norm_bias:
        groups = [{"params": params, "weight_decay": config.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR (stepped once per epoch) or OneCycleLR over the whole run (stepped per batch)."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=config.warmup,
        anneal_strategy="linear",
        div_factor=10.0,
        final_div_factor=100.0,
        cycle_momentum=False,
    )


def build_loaders(
    config: Config,
    train_set: ImageSet,
    test_set: ImageSet,
    device: torch.device,
    generator: torch.Generator,
):
    """Training and test loaders of the kind the config names."""
    if config.loader == "device":
        common = dict(device=device, channels_last=config.channels_last)
        train_loader = DeviceLoader(
            train_set, config.batch_size, shuffle=True, augment=config.augment,
            rotate_degrees=config.rotate_degrees, generator=generator, **common,
        )  # fmt: skip
        test_loader = DeviceLoader(test_set, 512, **common)
        return train_loader, test_loader
    common = dict(num_workers=config.num_workers, pin_memory=device.type == "cuda")
    train_loader = torchvision_loader(
        train_set, config.batch_size, train=True, augment=config.augment,
        rotate_degrees=config.rotate_degrees, generator=generator, **common,
    )  # fmt: skip
    test_loader = torchvision_loader(test_set, 512, train=False, **common)
    return train_loader, test_loader


class Run:
    """Everything one training run needs, built from a Config (used by :func:`fit`).

    Like every torch object it saves and restores itself through :meth:`state_dict` and
    :meth:`load_state_dict`: model, optimizer, scheduler, gradient scaler, every random state
    and the history, enough to continue exactly where it stopped.
    """

    def __init__(
        self,
        config: Config,
        datasets: tuple[ImageSet, ImageSet] | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.progress = progress
        self.device = select_device(config.device)
        seed_everything(config.seed)
        self.train_set, self.test_set = datasets or load_datasets(config)
        if config.norm == "gbn" and config.num_splits > min(config.batch_size, len(self.train_set)):
            raise ConfigError(
                f"num_splits ({config.num_splits}) is larger than the batch "
                f"({min(config.batch_size, len(self.train_set))} images)"
            )
        self.classes = self.train_set.classes
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = build_model(config, len(self.classes)).to(
            self.device, memory_format=memory_format
        )
        # What train and test call: the model itself, or its compiled version (same weights).
        self.compiled = torch.compile(self.model) if config.compile else self.model
        self.precision = choose_precision(self.device, config.precision, config.channels_last)
        self.amp_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaler)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loader, self.test_loader = build_loaders(
            config, self.train_set, self.test_set, self.device, self.generator
        )
        steps = len(self.train_loader)
        if config.max_batches:
            steps = min(steps, config.max_batches)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps)
        self.loss_fn = _cross_entropy(config.label_smoothing)
        self.history: list[dict[str, Any]] = []

    def train_epoch(self, epoch: int) -> dict[str, float]:
        per_step = self.scheduler if self.config.schedule == "onecycle" else None
        result = train(
            self.compiled, self.train_loader, self.optimizer, device=self.device,
            loss_fn=self.loss_fn, scheduler=per_step, scaler=self.scaler,
            amp_dtype=self.amp_dtype, channels_last=self.config.channels_last,
            max_batches=self.config.max_batches, progress=self.progress,
            desc=f"epoch {epoch} train",
        )  # fmt: skip
        if per_step is None:
            self.scheduler.step()
        return result

    def test_epoch(self, epoch: int | None = None) -> dict[str, float]:
        return test(
            self.compiled, self.test_loader, device=self.device, amp_dtype=self.amp_dtype,
            channels_last=self.config.channels_last, tta_flip=self.config.tta_flip,
            max_batches=self.config.max_batches, progress=self.progress,
            desc=f"epoch {epoch} test" if epoch else "test",
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The run's whole state, as ``last.pt`` stores it."""
        return {
            "config": self.config.to_dict(),
            "classes": list(self.classes),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.generator),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a run of the same recipe: the run
        folder checks that). On the CPU the continued run repeats the uninterrupted one
        exactly. Raises CheckpointError when this run cannot take the state."""
        check_classes(
            LAST, state["classes"], self.classes, "resume with the run's own data (--data)"
        )
        if self.config.schedule == "onecycle":
            saved_steps = state["scheduler"].get("total_steps")
            if saved_steps != self.scheduler.total_steps:
                raise CheckpointError(
                    f"the run follows a onecycle schedule of {saved_steps} steps "
                    f"({state['config']['epochs']} epochs); these settings need "
                    f"{self.scheduler.total_steps}: a onecycle run cannot be lengthened or "
                    "re-batched, so keep --epochs, --batch-size, --train-size and --max-batches, "
                    "or start a new run with --out"
                )
        load_weights(self.model, state, "the checkpoint")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:  # empty when saved without a gradient scaler (CPU, bf16)
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"], self.generator)
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"the run cannot be resumed with these settings ({error})"
            ) from None
        self.history = list(state["history"])


def _cross_entropy(label_smoothing: float) -> LossFn:
    def loss_fn(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction=reduction)

    return loss_fn


# --- random state and environment, as a run records them ---------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Python's, NumPy's, torch's (CPU and CUDA) and ``generator``'s random states."""
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


# --- a whole run -------------------------------------------------------------------------------


def fit(
    config: Config,
    *,
    out: str | Path | RunFolder | None = None,
    resume: bool = False,
    datasets: tuple[ImageSet, ImageSet] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``config.epochs`` epochs and return the history, one dict per epoch.

    With ``out``, every epoch atomically rewrites ``out/last.pt`` (everything needed to resume),
    ``out/best.pt`` (when the test accuracy improves) and ``out/metrics.json``. With
    ``resume=True`` the run continues from ``out/last.pt``. Ctrl-C or SIGTERM stop the run; the
    checkpoint of the last finished epoch stays, and :class:`~eva_utils.errors.Interrupted` says
    how to resume.
    """
    folder = _open_run_folder(out, resume, config)  # before loading data: refusing is instant
    try:
        return _fit(config, folder, datasets, progress, on_epoch)
    finally:
        if folder is not None and folder is not out:  # opened here: let the next trainer in
            folder.close()


def _fit(
    config: Config,
    folder: RunFolder | None,
    datasets: tuple[ImageSet, ImageSet] | None,
    progress: bool,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    run = None
    with sigterm_as_interrupt():
        try:
            run = Run(config, datasets, progress)
            if folder is not None:
                if folder.state is not None:
                    run.load_state_dict(folder.state)
                folder.start()
            epochs = epoch_bar(
                range(len(run.history) + 1, config.epochs + 1), total=config.epochs,
                progress=progress,
            )  # fmt: skip
            for epoch in epochs:
                row = _train_and_test(run, epoch)
                epochs.set_postfix(
                    test_acc=f"{row['test_acc']:.2%}", loss=f"{row['test_loss']:.3f}"
                )
                if folder is not None:
                    folder.save(run.state_dict(), environment(run.device))
                if on_epoch is not None:
                    on_epoch(row)
        except KeyboardInterrupt:
            raise _interrupted(folder, len(run.history) + 1 if run else 1) from None
        except TrainingDiverged as error:
            raise _diverged(error, config, folder) from None
    return run.history


def _open_run_folder(
    out: str | Path | RunFolder | None, resume: bool, config: Config
) -> RunFolder | None:
    if isinstance(out, RunFolder):  # opened and checked by the caller (the CLI)
        return out
    if out is None:
        if resume:
            raise ConfigError("resume needs the run folder (out=...)")
        return None
    folder = RunFolder.open(out, resume=resume)
    folder.check_recipe(config)
    return folder


def _train_and_test(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch of ``run``, appended to its history; the test loss must be finite."""
    started = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    trained = run.train_epoch(epoch)
    tested = run.test_epoch(epoch)
    if not math.isfinite(tested["loss"]):
        raise TrainingDiverged(
            f"the test loss became NaN or infinite after epoch {epoch} (the weights diverged "
            "in its last steps)"
        )
    row = {
        "epoch": epoch,
        "train_loss": trained["loss"],
        "train_acc": trained["acc"],
        "test_loss": tested["loss"],
        "test_acc": tested["acc"],
        "lr": lr,
        "seconds": time.perf_counter() - started,
    }
    run.history.append(row)
    return row


def _interrupted(folder: RunFolder | None, epoch: int) -> Interrupted:
    """What Ctrl-C or SIGTERM in ``epoch`` leaves, and how to continue."""
    if folder is None:
        return Interrupted(
            f"stopped in epoch {epoch}; without a run folder (out=...) there is nothing to resume"
        )
    # Count the epochs last.pt really holds: the signal may have come during its write.
    saved = folder.saved_epochs()
    if not saved:
        return Interrupted("stopped in epoch 1; no epoch had finished, nothing to resume")
    return Interrupted(
        f"stopped in epoch {saved + 1}; {folder.path / LAST} holds epochs 1-{saved}: "
        f"resume with: python -m eva_utils train --resume {folder.path}"
    )


def _diverged(
    error: TrainingDiverged, config: Config, folder: RunFolder | None
) -> TrainingDiverged:
    """The divergence, with what to change and what the run folder still holds."""
    message = f"{error}: {divergence_advice(config)}"
    saved = folder.saved_epochs() if folder is not None else 0
    if saved:
        message += (
            f", in a new run (a run keeps its recipe); {folder.path / LAST} keeps epochs "
            f"1-{saved}, the last good ones"
        )
    return TrainingDiverged(message)
