"""Which device trains, and how the hardware is described beside the numbers it produced."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from .errors import ConfigError, option
from .precision import Precision


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
            f"device {name!r} was asked for but CUDA is not available: use "
            f"{option('device', 'cpu')}"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
            "cuda:0 to cuda:N-1"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but MPS is not available: use {option('device', 'cpu')}"
        )
    return device


def describe(device: torch.device, precision: Precision) -> str:
    """The device, its hardware and what it computes in: "CPU (AMD EPYC 7B13 (2 cores)); training
    in fp32, channels_last" or "CUDA (Tesla T4, compute capability 7.5); training in fp16 with a
    gradient scaler, channels_last"."""
    hardware = environment(device)["device_name"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware += f", compute capability {major}.{minor}"
    return f"{device.type.upper()} ({hardware}); training in {precision.describe()}"


def environment(device: torch.device) -> dict[str, str]:
    """Versions and hardware, recorded in metrics.json beside the numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or device.type
    return {
        "torch": torch.__version__,
        # from the installed package's metadata, not by importing torchvision: its ops load
        # torch._dynamo, 3 CPU-seconds at every start on a 2-core EPYC (a run that trains
        # loads that anyway, for torch.optim, and saves half a second), and the default
        # loader never uses torchvision
        "torchvision": importlib.metadata.version("torchvision"),
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
