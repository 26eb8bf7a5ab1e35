"""Training throughput of ResNet18, three ways, in one process on the same data.

    python benchmarks/throughput.py --device cpu

(a) plain: the loop every course writes: fp32, NCHW, a torch DataLoader over PIL transforms
    (``eva_utils.loaders.torchvision_loader``, crop + flip) and ``.item()`` every step;
(b) library: ``eva_utils.engine.train`` on exactly what ``fit()`` builds by default
    (``TrainingState``): DeviceLoader (crop + flip on the device), the precision and memory
    format that ``eva_utils.precision.choose_precision`` picks (``--precision``,
    ``--no-channels-last`` change them), progress bar on;
(c) bound: a bare forward / backward / step on one pre-loaded batch, with (b)'s precision and
    memory format: no data loading and no metrics at all.

Every variant runs two untimed warm-up segments, then ``--repeats`` timed segments of
``--steps`` steps; the variants take turns (the order rotates every repeat) so background load
hits them alike, and the table shows medians. The default, many one-step segments, interleaves
as finely as possible: on a shared machine other people's jobs come and go within seconds.

The data is the real CIFAR-10 copy in ``../shared/data/cifar10-jpg.tar.gz`` when it is there
(``--data synthetic`` otherwise): the timings do not depend on the pixels, but the plain loop
then works on real images.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from eva_utils.config import PRECISIONS, Config, get_preset
from eva_utils.data import ImageSet, balanced_subset, load_cifar10, synthetic_cifar10
from eva_utils.devices import environment, select_device
from eva_utils.loaders import DeviceLoader, torchvision_loader
from eva_utils.recipe import build_model, build_optimizer
from eva_utils.state import TrainingState

ROOT = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
AUGMENT = ("crop", "flip")  # what every course's plain loop does; both loaders draw the same
VARIANTS = ("plain", "library", "bound")
WARMUP_SEGMENTS = 2  # allocator, oneDNN / cuDNN plans, DataLoader workers
LABELS = {
    "plain": "(a) plain: fp32, NCHW, DataLoader+PIL, .item()",
    "library": "(b) library: fit()'s default path",
    "bound": "(c) bound: fwd/bwd/step, pre-loaded batch",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per segment")
    parser.add_argument("--repeats", type=int, default=12, help="timed segments per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--preset", default="session8", help="the model and optimiser settings")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="(b) and (c)'s precision"
    )
    parser.add_argument(
        "--channels-last", default=True, action=argparse.BooleanOptionalAction,
        help="(b) and (c) in channels_last (default) or NCHW",
    )  # fmt: skip
    parser.add_argument(
        "--data", default="auto", help="auto (real CIFAR-10 if present), synthetic, or a path"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats) < 1:
        parser.error("--steps and --repeats must be positive")
    return args


def load_train_set(data: str, size: int) -> tuple[ImageSet, str]:
    """``size`` training images (enough that no loader starts a new epoch while being timed)."""
    if data == "auto":
        data = str(REAL_ARCHIVE) if REAL_ARCHIVE.is_file() else "synthetic"
    if data == "synthetic":
        train_set, _ = synthetic_cifar10(size, 10)
        return train_set, "synthetic CIFAR-shaped uint8 images"
    train_set, _ = load_cifar10(data)
    if size < len(train_set):
        train_set = balanced_subset(train_set, size, seed=0)
    return train_set, f"CIFAR-10 training images from {data}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def endless(loader) -> Iterator:
    while True:
        yield from loader


def plain_variant(config: Config, train_set: ImageSet, device: torch.device) -> Callable:
    """The hand-written loop of pytorch-cifar and the course notebooks."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    loader = torchvision_loader(
        train_set, config.batch_size, train=True, augment=AUGMENT,
        generator=torch.Generator().manual_seed(config.seed),
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    batches = endless(loader)
    totals = {"loss": 0.0, "correct": 0, "seen": 0}

    def run(steps: int) -> None:
        model.train()
        for _ in range(steps):
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss = F.cross_entropy(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals["loss"] += loss.item()
            totals["correct"] += outputs.argmax(1).eq(labels).sum().item()
            totals["seen"] += len(labels)

    return run


def library_variant(config: Config, train_set: ImageSet) -> tuple[Callable, TrainingState]:
    """``train`` on what ``fit(config)`` builds (``TrainingState``), ``config.max_batches``
    steps a call."""
    test_set = train_set.subset(torch.arange(min(512, len(train_set))))
    state = TrainingState(config, datasets=(train_set, test_set), progress=True)

    def run(steps: int) -> None:
        assert steps == config.max_batches, "train_epoch stops after config.max_batches"
        state.train_epoch(1)

    return run, state


def bound_variant(config: Config, train_set: ImageSet, state: TrainingState) -> Callable:
    """Forward, backward and step on one batch already on the device: nothing else."""
    torch.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config).to(state.device, memory_format=memory_format)
    optimizer = build_optimizer(model, config)
    loader = DeviceLoader(
        train_set, config.batch_size, device=state.device, shuffle=True, augment=AUGMENT,
        generator=torch.Generator().manual_seed(config.seed), channels_last=config.channels_last,
    )  # fmt: skip
    images, labels = next(iter(loader))
    scaler = torch.amp.GradScaler(state.device.type, enabled=state.precision.scaler)
    autocast = (
        torch.autocast(state.device.type, dtype=state.precision.dtype)
        if state.precision.dtype is not None
        else contextlib.nullcontext()
    )

    def run(steps: int) -> None:
        model.train()
        for _ in range(steps):
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return run


class PeakMemory:
    """Peak memory of the timed segments: CUDA allocator peak, else the process's peak RSS.

    On Linux the RSS high-water mark is reset before each segment (``/proc/self/clear_refs``),
    so each variant's figure is the process's peak while that variant ran: it still counts
    everything resident (all three models, the data set), not what the variant alone needs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type != "cuda" and self._reset_rss()
        self.what = (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak RSS of the whole process (resource.getrusage), "
            + ("reset before each segment" if self.resettable else "cumulative: not resettable")
        )

    @staticmethod
    def _reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._reset_rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "unknown"
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}, {five:.1f}, {fifteen:.1f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def hardware(device: torch.device) -> str:
    name = environment(device)["device_name"]
    if device.type == "cpu":
        name += f", {torch.get_num_threads()} torch threads"
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.batch_size
    config = preset.replace(
        device=str(device), batch_size=batch_size, augment=AUGMENT, max_batches=args.steps,
        loader="device", channels_last=args.channels_last, precision=args.precision,
        compile=False,
    )  # fmt: skip
    # +2: more batches than are ever drawn, so no loader starts a second epoch (and re-forks
    # its workers) during the run.
    train_set, data_note = load_train_set(
        args.data, batch_size * (args.steps * (WARMUP_SEGMENTS + args.repeats) + 2)
    )

    library, state = library_variant(config, train_set)
    runners = {
        "plain": plain_variant(config, train_set, device),
        "library": library,
        "bound": bound_variant(config, train_set, state),
    }
    precision = state.precision.describe()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    print(f"command:  {command}")
    print(f"hardware: {hardware(device)}; device {device}")
    print(f"torch:    {torch.__version__}")
    print(
        f"model:    {config.arch} ({args.preset} preset: norm {config.norm}, dropout "
        f"{config.dropout}), SGD, batch {batch_size}; library and bound in {precision}"
    )
    print(f"data:     {len(train_set):,} {data_note}, augmentation {'+'.join(AUGMENT)}")
    print(
        f"timing:   {WARMUP_SEGMENTS} warm-up + {args.repeats} timed segments of {args.steps} "
        "step(s) per variant, interleaved; medians"
    )

    print(f"load:     {load_average()} at the start")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
        print(
            "          busy machine: other jobs share these CPUs, so timings are slower and "
            "noisier (on a shared CPU, --threads 1 is steadier)"
        )
    memory = PeakMemory(device)
    for _, name in itertools.product(range(WARMUP_SEGMENTS), VARIANTS):
        runners[name](args.steps)
    synchronize(device)
    memory.reset()
    resident = memory.peak_bytes()
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    peaks: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
        for name in order:
            memory.reset()
            synchronize(device)
            started = time.perf_counter()
            runners[name](args.steps)
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks[name], memory.peak_bytes())

    results = {}
    for name in VARIANTS:
        per_step = statistics.median(seconds[name]) / args.steps
        results[name] = {
            "images_per_s": batch_size / per_step,
            "ms_per_step": 1000 * per_step,
            "peak_memory_bytes": peaks[name],
            "ms_per_step_each_repeat": [1000 * s / args.steps for s in seconds[name]],
        }
    speedup = results["library"]["images_per_s"] / results["plain"]["images_per_s"]
    fraction = results["library"]["images_per_s"] / results["bound"]["images_per_s"]

    print()
    print(f"{'variant':<46} {'images/s':>9} {'ms/step':>9} {'peak memory':>12}")
    for name in VARIANTS:
        row = results[name]
        print(
            f"{LABELS[name]:<46} {row['images_per_s']:>9.1f} {row['ms_per_step']:>9.1f} "
            f"{row['peak_memory_bytes'] / 2**20:>8.0f} MiB"
        )
    print()
    print(f"peak memory: {memory.what}; {resident / 2**20:.0f} MiB after the warm-up")
    for name in VARIANTS:
        each = ", ".join(f"{ms:.0f}" for ms in results[name]["ms_per_step_each_repeat"])
        print(f"ms/step per repeat, {name}: {each}")
    print(f"load average at the end: {load_average()}")
    if args.json is not None:
        figures = {
            "command": command,
            "hardware": hardware(device),
            "device": str(device),
            "torch": torch.__version__,
            "precision": precision,
            "batch_size": batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "data": data_note,
            "peak_memory": memory.what,
            "memory_after_warmup_bytes": resident,
            "variants": results,
            "speedup_vs_plain": speedup,
            "fraction_of_bound": fraction,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"speedup_vs_plain={speedup:.2f} fraction_of_bound={fraction:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
