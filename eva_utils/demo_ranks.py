"""Per-GPU BatchNorm *is* Ghost BatchNorm, shown in seconds on a CPU.

``torchrun --standalone --nproc-per-node 2 -m eva_utils.demo_ranks OUT`` trains a small conv +
BatchNorm network for a few SGD steps on two processes (gloo), each normalising its half of
every batch, through the same :class:`~eva_utils.step.Step` and ranks seam as ``train``;
``python -m eva_utils.demo_ranks OUT --norm gbn`` trains it in one process with
``GhostBatchNorm2d(num_splits=2)`` on the whole batches. Each writes its weights and running
statistics to ``OUT/<what>.pt``; :func:`compare` says how far apart they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gbn import GhostBatchNorm2d
from .ranks import Ranks, exit_process
from .step import Step

STEPS, BATCH = 8, 16


def small_network(norm: str) -> nn.Sequential:
    """conv 3->8, a norm layer, ReLU, global average pool, linear 8->10."""
    layer = GhostBatchNorm2d(8, num_splits=2) if norm == "gbn" else nn.BatchNorm2d(8)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10),
    )  # fmt: skip


def train(norm: str) -> dict[str, torch.Tensor]:
    """The network after :data:`STEPS` SGD steps on fixed random batches of :data:`BATCH`."""
    ranks = Ranks.from_environment()
    ranks.join(torch.device("cpu"))
    torch.manual_seed(0)
    model = small_network(norm)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(BATCH, 3, 8, 8, generator=generator),
         torch.randint(10, (BATCH,), generator=generator))
        for _ in range(STEPS)
    ]  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = Step(model, device="cpu", loss_fn=F.cross_entropy, ranks=ranks)
    model.train()
    for batch in batches:
        step.train(*step.to_device(batch), optimizer)
    ranks.average_buffers(model)  # each rank's running statistics, joined
    state = model.state_dict() if ranks.is_main else {}
    ranks.leave()
    return state


def compare(first: Path, second: Path) -> float:
    """The largest difference between two saved states' weights and running statistics."""
    a, b = (torch.load(path, weights_only=True) for path in (first, second))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if k in b
               and a[k].is_floating_point())  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the saved state")
    parser.add_argument("--norm", choices=("bn", "gbn"), default="bn")
    parser.add_argument("--name", default=None, help="file name (default: the norm)")
    args = parser.parse_args(argv)
    state = train(args.norm)
    if state:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, args.out / f"{args.name or args.norm}.pt")
    return 0


if __name__ == "__main__":
    exit_process(main())
