"""The fast path switched off is the plain path: same numbers as a hand-written fp32 loop."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eva_utils.config import Config
from eva_utils.data import synthetic_cifar10
from eva_utils.engine import test as evaluate
from eva_utils.engine import train
from eva_utils.loaders import DeviceLoader, Limited, torchvision_loader
from eva_utils.model import resnet18
from eva_utils.precision import choose_precision
from eva_utils.state import TrainingState

PLAIN = dict(
    precision="fp32", channels_last=False, loader="torchvision", compile=False, num_workers=0
)
TINY = dict(data="synthetic", train_size=16, test_size=10, batch_size=8, device="cpu")


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Bit for bit, parameters and buffers (BatchNorm running statistics) alike."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(
            x, y, rtol=0, atol=0, msg=lambda text, name=name: f"{name}: {text}"
        )


def test_fp32_means_fp32_everywhere():
    for device in ("cpu", "cuda", "mps"):
        assert choose_precision(torch.device(device), "fp32").dtype is None
    run = TrainingState(Config(**PLAIN, **TINY), progress=False)
    assert run.precision.dtype is None
    assert not run.step.scaler.is_enabled()
    assert run.step.model is run.model  # not compiled
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_cpu_bf16_needs_bf16_instructions_not_just_avx512(monkeypatch, native, expected):
    # oneDNN calls any AVX-512 CPU bf16-capable, but without AVX512-BF16 it emulates bf16,
    # more slowly than fp32: autocast must stay off there.
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert choose_precision(torch.device("cpu")).dtype == expected


def test_library_train_on_the_plain_path_equals_a_hand_written_loop():
    """A whole epoch through Config -> TrainingState -> train() against the loop every course
    writes, on the same batches (the session8 model: GBN, dropout; crop, flip and rotate in the
    DataLoader)."""
    config = Config(**PLAIN, **TINY)
    library = TrainingState(config, progress=False)
    result = library.train_epoch(1)

    reference = TrainingState(
        config, progress=False
    )  # seeds everything again: the same weights and draws
    model, optimizer = reference.model, reference.optimizer
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in reference.train_loader:
        outputs = model(images)
        loss = F.cross_entropy(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += len(labels)

    assert result["images"] == seen == 16
    torch.testing.assert_close(result["loss"], loss_sum / seen)
    assert result["acc"] == correct / seen
    assert_same_weights(library.model, reference.model)


def test_channels_last_gives_the_same_fp32_epoch():
    # No dropout: its mask is drawn in memory order, so channels_last draws other (equally
    # random) masks and the two runs would differ by more than rounding.
    config = Config(**{**PLAIN, "loader": "device"}, **TINY, dropout=0.0)
    nchw = TrainingState(config, progress=False)
    nhwc = TrainingState(config.replace(channels_last=True), progress=False)
    assert next(nhwc.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    plain, fast = nchw.train_epoch(1), nhwc.train_epoch(1)
    assert fast["acc"] == plain["acc"]
    # Other convolution kernels round differently, and an epoch amplifies rounding (an
    # activation within rounding of a ReLU's kink passes its gradient in one run and not in the
    # other). So the bound is measured here, on this CPU: channels_last may move the loss and
    # the weights as far as nudging the plain run's starting weights by one float32 ulp does
    # (the farthest of three nudges, times 3 for the spread between nudges).
    nudged = [_nudged_epoch(config, seed) for seed in range(3)]
    loss_noise = max(abs(loss - plain["loss"]) for loss, _ in nudged)
    weight_noise = max((weights - flat_weights(nchw.model)).norm() for _, weights in nudged)
    assert abs(fast["loss"] - plain["loss"]) <= 3 * loss_noise
    assert (flat_weights(nhwc.model) - flat_weights(nchw.model)).norm() <= 3 * weight_noise


def _nudged_epoch(config: Config, seed: int) -> tuple[float, torch.Tensor]:
    """(training loss, weights after) of one epoch that starts from every weight moved by about
    one float32 ulp."""
    run = TrainingState(config, progress=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in run.model.parameters():
            p.mul_(1 + torch.finfo(p.dtype).eps * torch.randn(p.shape, generator=generator))
    loss = run.train_epoch(1)["loss"]
    return loss, flat_weights(run.model)


def test_device_and_torchvision_loaders_give_the_same_test_metrics():
    _, test_set = synthetic_cifar10(16, 40)
    torch.manual_seed(0)
    model = resnet18()
    on_device = evaluate(model, DeviceLoader(test_set, 16), progress=False)
    classic = torchvision_loader(test_set, 16, train=False, num_workers=0)
    assert evaluate(model, classic, progress=False) == on_device  # the same inputs to the last bit


def test_max_batches_fetches_no_batch_it_does_not_train_on():
    fetched = []

    class CountingLoader:
        def __len__(self) -> int:
            return 10

        def __iter__(self):
            for index in range(10):
                fetched.append(index)
                yield torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train(model, Limited(CountingLoader(), 3), optimizer, progress=False)
    assert result["images"] == 12
    assert fetched == [0, 1, 2]


@pytest.mark.skipif(
    choose_precision(torch.device("cpu")).dtype is None, reason="this CPU has no native bf16"
)
def test_bf16_changes_only_the_precision():
    """With bf16 the epoch differs slightly from fp32 (it really is mixed precision), but not by
    much (it is the same computation)."""
    config = Config(**{**PLAIN, "loader": "device"}, **TINY)
    fp32 = TrainingState(config, progress=False)
    bf16 = TrainingState(config.replace(precision="auto"), progress=False)
    assert bf16.precision.dtype == torch.bfloat16
    plain, mixed = fp32.train_epoch(1), bf16.train_epoch(1)
    assert mixed["loss"] != plain["loss"]
    torch.testing.assert_close(mixed["loss"], plain["loss"], rtol=0.05, atol=0)


def test_fast_preset_trains_end_to_end_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "eva_utils", "train", "--preset", "fast", "--data", "synthetic",
        "--train-size", "128", "--test-size", "64", "--epochs", "2", "--batch-size", "64",
        "--arch", "tiny", "--out", str(out), "--quiet",
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(0.0 <= row["test_acc"] <= 1.0 for row in history)
