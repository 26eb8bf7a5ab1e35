"""Receptive fields against hand-worked values, brute force and ResNet18's known geometry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from eva_utils.cli import main
from eva_utils.model import resnet18
from eva_utils.plots import plot_erf
from eva_utils.receptive_fields import (
    effective_receptive_field,
    field_box,
    first_covering,
    format_receptive_field,
    layer_field,
    receptive_field,
)
from eva_utils.recipe import norm_layer


def three_convs(padding: int) -> nn.Sequential:
    """conv3 s1 -> conv3 s2 -> conv3 s1."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=1, padding=padding),
        nn.Conv2d(2, 2, 3, stride=2, padding=padding),
        nn.Conv2d(2, 2, 3, stride=1, padding=padding),
    )


class Residual(nn.Module):
    """A branch conv3 s2 -> conv3 s1 plus a 1x1 stride-2 shortcut, summed functionally."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, stride=1, padding=1)
        self.shortcut = nn.Conv2d(channels, 2, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class TinyNet(nn.Module):
    """Stem, a residual block, a functional pool and a dilated conv: every rule at once.

    By hand: stem conv3 p1: rf 3, jump 1, start 0. Branch conv3 s2 p1: rf 3 + 2*1 = 5, jump 2;
    conv3 p1: 5 + 2*2 = 9. Shortcut 1x1 s2: rf 3, jump 2. Sum: rf 9, jump 2, start 0.
    avg_pool 2 s2: rf 9 + 1*2 = 11, jump 4, start 0 + 0.5*2 = 1. conv3 dilation 2 (extent 5)
    p0: rf 11 + 4*4 = 27, jump 4, start 1 + 2*4 = 9.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.block = Residual(channels=2)
        self.head = nn.Conv2d(2, 2, 3, dilation=2)

    def forward(self, x: Tensor) -> Tensor:
        out = F.avg_pool2d(torch.tanh(self.block(torch.tanh(self.stem(x)))), 2)
        return self.head(out)


def by_name(rows):
    return {row.name: row for row in rows}


@pytest.mark.parametrize(
    ("padding", "starts"), [(1, (0.0, 0.0, 0.0)), (0, (1.0, 2.0, 4.0))], ids=["padded", "valid"]
)
def test_sequential_jump_rf_and_start(padding, starts):
    """jump 1, 2, 2; rf 3, 3 + 2*1 = 5, 5 + 2*2 = 9; start += ((k-1)/2 - p) * jump_in."""
    rows = receptive_field(three_convs(padding), (1, 16, 16))
    assert [row.jump for row in rows] == [(1, 1), (2, 2), (2, 2)]
    assert [row.rf for row in rows] == [(3, 3), (5, 5), (9, 9)]
    assert [row.start for row in rows] == [(s, s) for s in starts]
    assert [row.kernel for row in rows] == [(3, 3)] * 3
    assert [row.stride for row in rows] == [(1, 1), (2, 2), (1, 1)]


def test_residual_sum_takes_the_larger_branch():
    """Branch rf 3 -> 3 + 2*2 = 7 (jump 2), shortcut rf 1 (jump 2): the block sees 7."""
    rows = by_name(receptive_field(Residual(), (1, 16, 16)))
    assert rows["conv2"].rf == (7, 7)
    assert rows["shortcut"].rf == (1, 1)
    assert layer_field(Residual(), "", (1, 16, 16)).rf == (7, 7)
    assert layer_field(Residual(), "", (1, 16, 16)).jump == (2, 2)


def test_functional_pool_gets_a_row():
    rows = by_name(receptive_field(TinyNet(), (1, 32, 32)))
    pool = rows["avg_pool2d"]
    assert (pool.kernel, pool.stride, pool.jump, pool.rf, pool.start) == (
        (2, 2), (2, 2), (4, 4), (11, 11), (1.0, 1.0)
    )  # fmt: skip


def brute_force_field(model: nn.Module, size: int, unit: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Rows and columns of the input pixels whose change moves output ``unit`` (channel 0)."""
    torch.manual_seed(0)
    base = torch.randn(1, 1, size, size)
    perturbed = base.repeat(size * size, 1, 1, 1)
    perturbed.view(size * size, -1).diagonal().add_(1.0)  # image i changes pixel i only
    with torch.no_grad():
        change = model(perturbed)[:, 0, unit[0], unit[1]] - model(base)[0, 0, unit[0], unit[1]]
    moved = change.abs() > 1e-6  # float32 batches differ by ~1e-8 where nothing moved
    pixels = torch.nonzero(moved.view(size, size))
    return pixels[:, 0], pixels[:, 1]


def test_rf_and_start_match_brute_force():
    torch.manual_seed(1)
    model = TinyNet().eval()
    row = receptive_field(model, (1, 32, 32))[-1]
    unit = (2, 2)  # centre 9 + 2*4 = 17: field 17 - 13 = 4 .. 30, inside the 32x32 image
    rows, cols = brute_force_field(model, 32, unit)
    for axis, found in enumerate((rows, cols)):
        assert found.max() - found.min() + 1 == row.rf[axis] == 27
        assert (found.max() + found.min()) / 2 == row.centre(unit)[axis] == 17


def test_resnet18_field_at_the_end_of_each_stage():
    """By hand (3x3 convs add 2 * jump; stride-2 convs double the jump after adding):

    stem conv1: rf 3, jump 1. layer1: four 3x3 s1 convs, +2 each: 3 + 8 = 11, jump 1.
    layer2: conv s2 11 + 2 = 13 (jump 2), then three convs +4: 25; shortcut 1x1 s2: 11 < 17.
    layer3: 25 + 4 = 29 (jump 4), then +8 three times: 53. layer4: 53 + 8 = 61 (jump 8),
    then +16 three times: 109. avg_pool2d(4) on the 4x4 map: 109 + 3*8 = 133, jump 32, and
    its one unit is centred at 0 + 1.5*8 = 12 (the stride-2 convs' padding shifts it left).
    """
    rows = by_name(receptive_field(resnet18()))
    expected = {
        "conv1": (3, 1), "layer1.1": (11, 1), "layer2.1": (25, 2), "layer3.1": (53, 4),
        "layer4.1": (109, 8), "avg_pool2d": (133, 32), "linear": (133, 32),
    }  # fmt: skip
    assert {name: (rows[name].rf[0], rows[name].jump[0]) for name in expected} == expected
    assert rows["layer2.0.shortcut.0"].rf == (11, 11)
    assert rows["linear"].start == (12.0, 12.0)


def test_resnet18_flags_the_first_layer_that_sees_the_whole_image():
    """layer3.0.conv1 sees 29 < 32 pixels; layer3.0.conv2 sees 37 and its unit at 16 covers
    16 - 18 = -2 .. 16 + 18 = 34. Every unit first covers the image at layer4.0.conv2 (rf 77:
    unit 0 spans -38..38); layer4.0.conv1 (rf 61) leaves unit 0 at -30..30, short of pixel 31."""
    rows = receptive_field(resnet18())
    assert first_covering(rows, (32, 32)).name == "layer3.0.conv2"
    assert first_covering(rows, (32, 32), every_unit=True).name == "layer4.0.conv2"
    flagged = [line for line in format_receptive_field(rows).splitlines() if line.endswith("*")]
    assert len(flagged) == 1 and "layer3.0.conv2 (Conv2d)" in flagged[0]


def test_receptive_field_leaves_model_and_rng_unchanged():
    torch.manual_seed(3)
    model = resnet18(norm_layer=norm_layer("gbn")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    receptive_field(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_inplace_activation_row_shows_no_kernel():
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(inplace=True))
    conv, relu = receptive_field(model, (1, 8, 8))
    assert (conv.kernel, relu.kernel) == ((3, 3), None)
    assert relu.rf == conv.rf == (3, 3)


class Gate(nn.Module):
    """Squeeze-and-excitation's broadcast: every unit scaled by the whole map's mean."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x.mean((2, 3), keepdim=True)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Upsample(scale_factor=2), "upsample"),
        (nn.MaxPool2d(3, stride=1, padding=1), "max_pool2d"),  # keeps the size: not element-wise
        (nn.AdaptiveAvgPool2d(2), "adaptive_avg_pool2d"),
        (nn.ConvTranspose2d(1, 1, 3, padding=1), "transposed"),  # keeps the size too
        (nn.ZeroPad2d(1), "constant_pad_nd"),
        (Gate(), "mul"),
    ],
    ids=["upsample", "max_pool", "adaptive_pool", "transposed_conv", "pad", "broadcast"],
)
def test_op_it_does_not_follow_is_refused(layer, match):
    """No model of this package runs these; the tracer refuses them rather than guess."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3), layer)
    with pytest.raises(NotImplementedError, match=match):
        receptive_field(model, (1, 8, 8))


def test_rf_command_prints_jump_and_rf(capsys):
    assert main(["rf"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert {"Jump", "RF", "Start"} <= set(header)
    assert "avg_pool2d (F.avg_pool2d)" in out and "layer3.0.conv2" in out


def test_erf_stays_inside_the_theoretical_field():
    torch.manual_seed(0)
    model = three_convs(padding=1)
    erf = effective_receptive_field(model, torch.randn(8, 1, 16, 16), layer="2")
    top, left, bottom, right = field_box(layer_field(model, "2", (1, 16, 16)), (16, 16))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[int(top + 0.5) : int(bottom + 0.5), int(left + 0.5) : int(right + 0.5)] = True
    assert erf.shape == (16, 16) and erf.max() == 1 and erf.min() >= 0
    assert erf[~inside].abs().sum() == 0 and erf[inside].min() > 0


def test_erf_leaves_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    effective_receptive_field(model, torch.randn(4, 1, 12, 12))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plot_erf_outlines_the_clipped_field_on_both_maps():
    row = layer_field(resnet18(), "layer4")  # 109 pixels: clipped to the 32x32 image
    fig = plot_erf(torch.rand(32, 32), torch.rand(32, 32), row)
    assert isinstance(fig, Figure)
    boxes = [p for ax in fig.axes[:2] for p in ax.patches if isinstance(p, Rectangle)]
    assert [(b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in boxes] == [
        (-0.5, -0.5, 32.0, 32.0)
    ] * 2


@pytest.mark.parametrize(
    "first_import",
    ["import eva_utils", "from eva_utils.receptive_fields import RFRow",
     "from eva_utils import receptive_fields as rf", "from eva_utils import receptive_field"],
)  # fmt: skip
def test_receptive_field_is_a_plain_function_of_the_package_whatever_was_imported_first(
    first_import,
):
    """``eva_utils.receptive_field(model)`` is the function itself; its module has a name of its
    own (``eva_utils.receptive_fields``), so the two never shadow each other."""
    code = (
        f"{first_import}\n"
        "import types\n"
        "import eva_utils\n"
        "from eva_utils import receptive_field as from_package\n"
        "from eva_utils.receptive_fields import receptive_field, print_receptive_field\n"
        "assert isinstance(eva_utils.receptive_field, types.FunctionType)\n"
        "assert eva_utils.receptive_field is receptive_field is from_package\n"
        "rows = eva_utils.receptive_field(eva_utils.resnet18(), (3, 32, 32))\n"
        "assert rows == receptive_field(eva_utils.resnet18())\n"
        "assert rows[-1].rf == (133, 133) and callable(print_receptive_field)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
