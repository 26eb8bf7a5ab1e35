"""Which number format training computes in, chosen by what the hardware computes natively.

``auto`` takes bf16 where the hardware has bf16 arithmetic (CUDA compute capability 8.0 and
up, CPUs with bf16 instructions), else fp16 with a gradient scaler where it has fp16 tensor cores
(CUDA 7.x: T4, V100), else fp32. ``torch.cuda.is_bf16_supported()`` is not asked: it also says
yes where bf16 is only emulated (a T4), without the speed that makes it worth using.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch

from .config import PRECISIONS, choice_problem, refuse
from .errors import option

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# The first compute capability with bf16 (Ampere), and with fp16 tensor cores (Volta).
CUDA_BF16, CUDA_FP16 = (8, 0), (7, 0)


@dataclass(frozen=True)
class Hardware:
    """What the choice depends on: the device kind, a GPU's compute capability (major, minor),
    and whether a CPU has bf16 instructions."""

    kind: str
    capability: tuple[int, int] | None = None
    cpu_bf16: bool = False

    @classmethod
    def of(cls, device: torch.device) -> Hardware:
        if device.type == "cuda":
            return cls("cuda", capability=tuple(torch.cuda.get_device_capability(device)))
        if device.type == "cpu":
            return cls("cpu", cpu_bf16=_cpu_has_native_bf16())
        return cls(device.type)

    def native(self) -> tuple[torch.dtype, ...]:
        """The reduced-precision dtypes this hardware computes natively, the preferred first."""
        if self.kind == "cuda" and self.capability >= CUDA_BF16:
            return (torch.bfloat16, torch.float16)
        if self.kind == "cuda" and self.capability >= CUDA_FP16:
            return (torch.float16,)
        if self.kind == "cpu" and self.cpu_bf16:
            return (torch.bfloat16,)
        return ()  # older GPUs, AVX2 CPUs; MPS: fp32 until measured otherwise


@dataclass(frozen=True)
class Precision:
    """How a run computes: the autocast dtype (None: fp32), whether a gradient scaler guards
    fp16 gradients against underflow, and the memory format of the model and the batches (the
    config's switch: :func:`decide` keeps it on every platform)."""

    dtype: torch.dtype | None
    scaler: bool
    channels_last: bool

    @property
    def name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> str:
        """E.g. "fp16 with a gradient scaler, channels_last" or "fp32, NCHW"."""
        scaler = " with a gradient scaler" if self.scaler else ""
        return f"{self.name}{scaler}, {'channels_last' if self.channels_last else 'NCHW'}"


def decide(hardware: Hardware, precision: str = "auto", channels_last: bool = True) -> Precision:
    """The precision ``precision`` (one of :data:`PRECISIONS`) means on ``hardware``, with
    the config's ``channels_last`` switch.

    channels_last stays as the config says everywhere: tensor-core and oneDNN bf16 kernels want
    NHWC, and an fp32 training step on an AVX2 CPU was measured no slower in it (3% and 9%
    faster than NCHW in two interleaved one-thread runs: README, *What runs where*).
    """
    refuse(choice_problem("precision", precision, PRECISIONS))
    if precision == "auto":
        native = hardware.native()
        dtype = native[0] if native else None
    else:
        dtype = DTYPES[precision]
    return Precision(dtype, scaler=dtype == torch.float16, channels_last=channels_last)


def choose_precision(
    device: torch.device, precision: str = "auto", channels_last: bool = True
) -> Precision:
    """:func:`decide` for ``device`` (:func:`emulation_note` says when it will be slow)."""
    if precision == "fp32":  # asks the hardware nothing: valid for a device that is not here
        return decide(Hardware(device.type), precision, channels_last)
    return decide(Hardware.of(device), precision, channels_last)


def emulation_note(device: torch.device, precision: str) -> str:
    """The line that says an explicit ``precision`` is only emulated on ``device``, so that
    training runs, slowly (bf16 on a T4 or an AVX2 CPU; fp16 on any CPU, 8-12x slower than
    fp32), or "" where it is not."""
    if precision not in ("bf16", "fp16") or device.type not in ("cuda", "cpu"):
        return ""
    hardware = Hardware.of(device)
    if DTYPES[precision] in hardware.native() or (precision == "fp16" and device.type == "cuda"):
        return ""  # fp16 on a GPU without tensor cores is slower, not emulated
    if precision == "fp16":  # no CPU computes in fp16
        where, how = "a CPU", "8-12x slower than in fp32"
    else:
        where, how = f"this {device.type} ({_hardware_name(hardware)})", "slowly"
    return (
        f"note: {precision} is emulated on {where}: training runs, {how}; "
        f"{option('precision', 'auto')} uses {decide(hardware).name} here"
    )


def _hardware_name(hardware: Hardware) -> str:
    if hardware.kind == "cuda":
        return f"compute capability {'.'.join(map(str, hardware.capability))}"
    return "no bf16 instructions"


def _cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 on x86, BF16 on Arm). oneDNN's own
    check also says yes on any AVX-512 CPU (Skylake to Ice Lake), which emulates bf16 more slowly
    than it computes fp32."""
    with contextlib.suppress(AttributeError, RuntimeError):
        if platform.machine().lower() in ("x86_64", "amd64"):
            return bool(torch.cpu._is_avx512_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
