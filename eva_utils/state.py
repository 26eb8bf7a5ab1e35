"""A training run's state, built from a Config: the model, the step that computes it, the
optimizer, the schedule and every random stream, saved and restored like any torch object
through ``state_dict`` and ``load_state_dict``."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from .config import Config, ghost_batch_problem, refuse
from .data import ImageSet, load_datasets, split_validation
from .devices import select_device
from .engine import test, train
from .errors import CheckpointError, option, spelled
from .loaders import build_loaders, eval_loader
from .precision import choose_precision
from .ranks import Ranks
from .recipe import build_model, build_optimizer, build_scheduler
from .runfolder import LAST, check_classes, load_weights
from .step import Step, cross_entropy


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingState:
    """Everything one training run needs and changes, built from a Config.

    ``model`` is the network, ``val_set`` the validation split (None without
    ``config.val_size``), ``step`` computes its batches (``step.model`` is what it calls:
    the model, or its compiled version), and ``history`` holds one row per finished epoch. Like
    every torch object it saves and restores itself through :meth:`state_dict` and
    :meth:`load_state_dict`: model, optimizer, scheduler, gradient scaler, every random state and
    the history, enough to continue exactly where it stopped.
    """

    def __init__(
        self,
        config: Config,
        datasets: tuple[ImageSet, ImageSet] | None = None,
        progress: bool = True,
        ranks: Ranks | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.ranks = ranks = ranks or Ranks()
        self.device = ranks.local_device(select_device(config.device))
        seed_everything(config.seed)
        self.train_set, self.test_set = datasets or load_datasets(config)
        # held out of the training images, never trained on; None without config.val_size
        self.train_set, self.val_set = split_validation(
            self.train_set, config.val_size, config.seed
        )
        refuse(ranks.batch_problem(config.batch_size, len(self.train_set)))
        if config.norm == "gbn":
            batch = min(config.batch_size, len(self.train_set)) // ranks.world_size
            refuse(ghost_batch_problem(config.num_splits, batch, f"the batch ({batch} images)"))
        self.classes = self.train_set.classes
        self.model = build_model(config, len(self.classes))
        self.precision = choose_precision(self.device, config.precision, config.channels_last)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loader, self.test_loader = build_loaders(
            config, self.train_set, self.test_set, self.device, self.generator
        )
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = eval_loader(config, self.val_set, self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, len(self.train_loader))
        self.step = Step(
            self.model, device=self.device, precision=self.precision,
            loss_fn=cross_entropy(config.label_smoothing), tta_flip=config.tta_flip,
            compile=config.compile,
            scheduler=self.scheduler if config.schedule == "onecycle" else None, ranks=ranks,
        )  # fmt: skip
        self.history: list[dict[str, Any]] = []

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Epoch ``epoch`` of training (:func:`~eva_utils.engine.train`); a StepLR schedule
        steps after it (a onecycle schedule steps with every batch, in the step)."""
        result = train(
            self.model, self.train_loader, self.optimizer, self.step, self.progress,
            desc=f"epoch {epoch} train",
        )  # fmt: skip
        if self.config.schedule == "step":
            self.scheduler.step()
        return result

    def test_epoch(self, epoch: int | None = None) -> dict[str, float]:
        """The test set's loss and accuracy now (:func:`~eva_utils.engine.test`)."""
        desc = f"epoch {epoch} test" if epoch else "test"
        return test(self.model, self.test_loader, self.step, self.progress, desc)

    def val_epoch(self, epoch: int) -> dict[str, float]:
        """The validation split's loss and accuracy now, read as the test set is."""
        desc = f"epoch {epoch} validation"
        return test(self.model, self.val_loader, self.step, self.progress, desc)

    def state_dict(self) -> dict[str, Any]:
        """The run's whole state, as ``last.pt`` stores it."""
        return {
            "config": self.config.to_dict(),
            "classes": list(self.classes),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "rng": rng_state(self.generator),
            "history": list(self.history),
            **({"world_size": self.ranks.world_size} if self.ranks.distributed else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a run of the same recipe: the run
        folder checks that). On the CPU the continued run repeats the uninterrupted one
        exactly. Raises CheckpointError when this run cannot take the state."""
        check_classes(
            LAST,
            state["classes"],
            self.classes,
            f"resume with the run's own data ({option('data')})",
        )
        saved_world = state.get("world_size", 1)
        if saved_world != self.ranks.world_size:
            raise CheckpointError(_world_changed(saved_world, self.ranks.world_size, self.config))
        if self.config.schedule == "onecycle":
            saved_steps = state["scheduler"].get("total_steps")
            if saved_steps != self.scheduler.total_steps:
                raise CheckpointError(
                    f"the run follows a onecycle schedule of {saved_steps} steps "
                    f"({state['config']['epochs']} epochs); these settings need "
                    f"{self.scheduler.total_steps}: a onecycle run cannot be lengthened or "
                    "re-batched, so keep "
                    + ", ".join(option(name) for name in ("epochs", "batch_size", "train_size"))
                    + f" and {option('max_batches')}, or start a new run with {option('out')}"
                )
        load_weights(self.model, state, "the checkpoint")
        check_scaler_state(state["scaler"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:  # empty when saved without a gradient scaler (CPU, bf16)
                self.step.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"], self.generator)
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(
                f"the run cannot be resumed with these settings ({error})"
            ) from None
        self.history = list(state["history"])


def _world_changed(saved: int, now: int, config: Config) -> str:
    """Why a run trained on ``saved`` processes cannot go on with ``now``: each BatchNorm
    normalises one process's slice of the batch, so the recipe would change mid-run."""
    splits = config.num_splits if config.norm == "gbn" else 1
    per_norm = [config.batch_size // world // splits for world in (saved, now)]
    processes = spelled("--nproc-per-node", "processes")
    return (
        f"the run was trained on {saved} process(es), this is {now}: each BatchNorm would "
        f"normalise {per_norm[1]} images instead of {per_norm[0]}, another recipe; resume it "
        f"with {saved} {processes} (torchrun), or start a new run with {option('out')}"
    )


def check_scaler_state(scaler: Any) -> None:
    """Refuse a gradient scaler's saved state that would break the run: not a dict, or a scale
    that is not a positive finite number (a NaN scale skips every later step, silently)."""
    if not isinstance(scaler, dict):
        raise CheckpointError(
            f"{LAST}: its gradient scaler state is a {type(scaler).__name__}, not a dict: the "
            "file was not written by this program; start a new run"
        )
    scale = scaler.get("scale")
    if scale is not None and not (isinstance(scale, int | float) and 0 < scale < math.inf):
        raise CheckpointError(
            f"{LAST}: its gradient scaler's scale is {scale!r}, not a positive finite number "
            "(every later step would be skipped); start a new run"
        )


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
