"""The seam for ranks: which process this is among those ``torchrun`` started, and the little
that the epoch loop asks of the others.

``torchrun`` gives every process ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the address
of the rendezvous); a plain ``python`` process has none of them and is rank 0 of a world of 1,
for which every method here does nothing and the loop runs exactly the code a single process
runs. Only this module knows about ranks: the loop asks "is this the main process?", "sum this
epoch over the ranks", "average the BatchNorm statistics", "wait for everyone".

Several ranks train one run the way one process would: ``batch_size`` is the global batch, rank
r computes the r-th slice of it (:meth:`Ranks.share`), DistributedDataParallel averages the
gradients, and each rank's BatchNorm normalises only its own slice. That is Ghost BatchNorm with
one ghost batch per rank: N ranks with ``norm="bn"`` train the model that one process trains
with ``norm="gbn", num_splits=N``, and N ranks with GBN of k splits the one of k*N splits.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError, EvaError, option

# How long a rank waits in a collective for the others before it gives up: a peer that died is
# normally noticed by torchrun (which then stops every rank) or by the lost connection within
# seconds; this bounds the rest. EVA_DIST_TIMEOUT overrides it (seconds).
TIMEOUT_ENV, DEFAULT_TIMEOUT = "EVA_DIST_TIMEOUT", 300.0
_joined = False  # this process joined a process group (its gloo threads may outlive it)


class PeerFailed(EvaError):
    """Another rank stopped: the main process reported why (``reported`` True: it printed the
    line itself), or this rank lost the connection to the others."""

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's number on its own machine: which GPU it takes

    @classmethod
    def from_environment(cls) -> Ranks:
        """The ranks torchrun set in the environment; a world of 1 without them. Variables
        that torchrun would not have set (a RANK without a WORLD_SIZE, a WORLD_SIZE without the
        rendezvous's address, a port or timeout that is no number) are a ConfigError."""
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        ranks = cls(*(_whole_number(name, os.environ.get(name, text))
                      for name, text in defaults.items()))  # fmt: skip
        fix = f"start the ranks with torchrun, or unset {_set_variables()} to train in one process"
        if not 0 <= ranks.rank < ranks.world_size:
            raise ConfigError(
                f"RANK {ranks.rank} is outside a WORLD_SIZE of {ranks.world_size}: {fix}"
            )
        if ranks.distributed:
            missing = [name for name in RENDEZVOUS if not os.environ.get(name)]
            if missing:
                raise ConfigError(
                    f"WORLD_SIZE is {ranks.world_size} but {' and '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not set (torchrun sets them): {fix}"
                )
            port = _whole_number("MASTER_PORT", os.environ["MASTER_PORT"])
            if not 1 <= port <= 65535:
                raise ConfigError(f"MASTER_PORT must be a port from 1 to 65535, got {port}")
            timeout_seconds()  # refused now, not when the ranks meet
        return ranks

    @property
    def is_main(self) -> bool:
        """The one process that writes the run folder and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # --- joining the others --------------------------------------------------------------------

    def local_device(self, device: torch.device) -> torch.device:
        """The device this process trains on: its own GPU (``cuda:LOCAL_RANK``) for CUDA."""
        if device.type == "cuda" and self.distributed:
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"{self} has LOCAL_RANK {self.local_rank}, but this machine has "
                    f"{torch.cuda.device_count()} GPU(s): start at most that many processes per "
                    "machine (--nproc-per-node)"
                )
            return torch.device("cuda", self.local_rank)
        return device

    def join(self, device: torch.device) -> None:
        """Join the process group (NCCL between GPUs, gloo on CPUs), once per process."""
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        seconds = timeout_seconds()
        backend = "nccl" if device.type == "cuda" else "gloo"
        global _joined
        try:
            dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=seconds), device_id=_device_id(device)
            )
            _joined = True
        except (RuntimeError, ValueError) as error:  # DistStoreError: the others never came
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise PeerFailed(
                f"{self} could not meet the other ranks at {where} within {seconds:g} s "
                f"({error.__class__.__name__}): start all {self.world_size} with torchrun, or "
                f"unset {_set_variables()} to train in one process"
            ) from None

    def check_same(self, recipe: Mapping[str, Any]) -> None:
        """Refuse, on every rank, ranks that were started with different settings (``recipe``:
        the config and the run folder): they would train different runs as if one, or stop
        in a collective that the others never reach. Raises ConfigError naming the first rank
        that differs from rank 0 and each setting it differs in."""
        if not self.distributed:
            return
        every: list[Any] = [None] * self.world_size
        self._collective(dist.all_gather_object, every, dict(recipe))
        main = every[0]
        for rank, other in enumerate(every[1:], 1):
            names = [*main, *(name for name in other if name not in main)]
            differs = [name for name in names if main.get(name) != other.get(name)]
            if differs:
                shown = ", ".join(
                    f"{option(name, _shown(main.get(name)))} on rank 0, "
                    f"{_shown(other.get(name))} on rank {rank}"
                    for name in differs
                )
                raise ConfigError(
                    f"rank {rank} was started with other settings than rank 0 ({shown}): the "
                    "ranks of one run train one recipe; start them all with the same command"
                )

    def agree(self, problem: str | None) -> None:
        """Every rank learns whether the main process found a ``problem`` (it raised it); the
        others raise :class:`PeerFailed`, so that no rank waits for one that stopped."""
        if not self.distributed:
            return
        said = [problem if self.is_main else None]
        self._collective(dist.broadcast_object_list, said, src=0)
        if said[0] is not None and not self.is_main:
            raise PeerFailed(f"rank 0 stopped: {said[0]}", reported=True)

    def wait_for_everyone(self) -> None:
        """Return when every rank has reached this point."""
        if self.distributed:
            self._collective(dist.barrier)

    def batch_problem(self, batch_size: int, images: int | None = None) -> str | None:
        """Why the ranks cannot share batches of ``batch_size`` from ``images`` training
        images (None when they can): each needs the same share of every full batch, and at
        least one image of the last, smaller one."""
        if not self.distributed:
            return None
        if batch_size % self.world_size:
            return (
                f"batch_size {batch_size} cannot be shared by {self.world_size} processes "
                f"(it is the global batch: give a multiple of {self.world_size})"
            )
        last = images % batch_size if images else 0
        if 0 < last < self.world_size:
            return (
                f"the last batch of each epoch holds {last} of the {images} training images, "
                f"fewer than the {self.world_size} processes: change batch_size or train_size"
            )
        return None

    def normalisation(self, batch_size: int, ghost_batches: int) -> dict[str, int]:
        """What a run records about how it normalised: the world size and the images per
        rank and per BatchNorm (per ghost batch); nothing for a single process."""
        if not self.distributed:
            return {}
        per_rank = batch_size // self.world_size
        return {
            "world_size": self.world_size,
            "images_per_rank": per_rank,
            "images_per_norm": per_rank // ghost_batches,
        }

    # --- what a rank computes ------------------------------------------------------------------

    def share(self, batch: Tensor) -> Tensor:
        """This rank's slice of a global batch: ``tensor_split`` into world_size parts, the
        split Ghost BatchNorm makes (sizes differing by at most one)."""
        return batch.tensor_split(self.world_size)[self.rank] if self.distributed else batch

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model under DistributedDataParallel (gradients averaged over the ranks); each
        rank keeps its own BatchNorm statistics (:meth:`average_buffers` joins them)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are not synchronised at each forward: rank 0's would replace the others' and
        # keep only its slice's statistics. torch >= 2.13 names the switch forward_sync_buffers.
        parameters = inspect.signature(DistributedDataParallel).parameters
        switch = "forward_sync_buffers" if "forward_sync_buffers" in parameters else None
        options = {switch: False} if switch else {"broadcast_buffers": False}
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **options)

    def average_buffers(self, model: nn.Module) -> None:
        """Replace each BatchNorm's running statistics by their mean over the ranks: the
        statistics one process with one ghost batch per rank keeps."""
        if not self.distributed:
            return
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for buffer in (module.running_mean, module.running_var):
                    self._collective(dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
                    buffer.div_(self.world_size)

    def reduce(self, result: dict[str, float]) -> dict[str, float]:
        """An epoch's ``{"loss", "acc", "images"}`` (:func:`~eva_utils.engine.train`,
        :func:`~eva_utils.engine.test`) over the images of every rank; this rank's alone in a
        world of 1."""
        if not self.distributed:
            return result
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        images = result["images"]
        totals = torch.tensor(
            [result["loss"] * images, result["acc"] * images, images],
            dtype=torch.float64, device=device,
        )  # fmt: skip
        self._collective(dist.all_reduce, totals, op=dist.ReduceOp.SUM)
        loss_sum, correct, images = totals.tolist()
        return {"loss": loss_sum / images, "acc": round(correct) / images, "images": int(images)}

    def seed(self, seed: int, epoch: int) -> None:
        """Seed this rank's own random draws (dropout) for ``epoch``: each rank draws other
        masks, and a resumed run draws the ones an unbroken run drew. A world of 1 keeps the
        single process's stream."""
        if self.distributed:
            # modulo 2**63: a seed near the top of its range must not overflow torch's int64
            torch.manual_seed((seed * 1_000_003 + epoch * 1_009 + self.rank) % 2**63)

    def _collective(self, operation, *args, **kwargs):
        try:
            return operation(*args, **kwargs)
        except (RuntimeError, ValueError) as error:  # DistBackendError, a lost connection
            raise PeerFailed(
                f"{self} lost the other ranks ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no message'}); one of them "
                "stopped: see its line above"
            ) from None

    def leave(self) -> None:
        """Leave the process group (at the end of training)."""
        if self.distributed:
            leave()


def leave() -> None:
    """End this process's part in a torchrun process group, if it joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a ``python -m`` process with ``code``; one that joined a process group ends at
    once, its output flushed, without Python's shutdown. Gloo's worker threads outlive
    ``destroy_process_group`` where DistributedDataParallel wrapped a model, and one that
    releases a finished collective's tensors while the interpreter shuts down takes the GIL
    and aborts the process ("terminate called without an active exception", SIGABRT): 2 of
    12 two-process demos beside a busy loop on 2 cores, and torchrun reports the run failed."""
    if not _joined:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")  # where the ranks meet: torchrun sets both


def timeout_seconds() -> float:
    """How long a rank waits for the others: ``$EVA_DIST_TIMEOUT`` seconds, or 300."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text.strip() else DEFAULT_TIMEOUT
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # also refuses NaN
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


def _whole_number(name: str, text: str) -> int:
    """The whole number an environment variable ``name`` holds, else a ConfigError."""
    if not text.strip().isdecimal():  # isdigit() would let "²" through to int()
        raise ConfigError(f"{name} must be a whole number (torchrun sets it), got {text!r}")
    return int(text)


def _set_variables() -> str:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", *RENDEZVOUS)
    return ", ".join(name for name in names if name in os.environ) or "WORLD_SIZE"


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None
