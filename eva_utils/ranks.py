"""The seam for ranks: which process this is among those ``torchrun`` started, and the little
that the epoch loop asks of the others.

``torchrun`` gives every process ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain
``python`` process has none of them and is rank 0 of a world of 1, for which every method here
does nothing and the loop runs exactly the code a single process runs. Only this module knows
about ranks: the loop asks "is this the main process?", "sum this epoch meter over the ranks",
"wait for everyone".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's number on its own machine: which GPU it takes

    @classmethod
    def from_environment(cls) -> Ranks:
        """The ranks torchrun set in the environment; a world of 1 without them."""
        try:
            ranks = cls(*(int(os.environ.get(name, default)) for name, default in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))  # fmt: skip
        except ValueError:
            raise ConfigError(
                "RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)"
            ) from None
        if not 0 <= ranks.rank < ranks.world_size:
            raise ConfigError(f"RANK {ranks.rank} is outside a WORLD_SIZE of {ranks.world_size}")
        if ranks.world_size > 1:
            raise ConfigError(
                f"this process is one of {ranks.world_size} (WORLD_SIZE): training on several "
                "processes is not supported yet; run one process (python -m eva_utils train)"
            )
        return ranks

    @property
    def is_main(self) -> bool:
        """The one process that writes the run folder and shows progress."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """The device this process trains on: its own GPU (``cuda:LOCAL_RANK``) for CUDA."""
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def reduce(self, result: dict[str, float]) -> dict[str, float]:
        """An epoch's ``{"loss", "acc", "images"}`` (:func:`~eva_utils.engine.train`,
        :func:`~eva_utils.engine.test`) over the images of every rank; this rank's alone in a
        world of 1."""
        if self.world_size > 1:  # pragma: no cover - the distributed training issue fills this
            raise NotImplementedError
        return result

    def wait_for_everyone(self) -> None:
        """Return when every rank has reached this point."""
        if self.world_size > 1:  # pragma: no cover - the distributed training issue fills this
            raise NotImplementedError
