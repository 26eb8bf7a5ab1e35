"""The pytorch-cifar ResNet18: parameter count, the assignment's summary table, GBN and dropout."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchsummary
from torch import nn

from eva_utils import GhostBatchNorm2d, count_parameters, resnet18, resnet34, summary
from eva_utils.config import ARCHITECTURES, get_preset
from eva_utils.model import resnet_tiny
from eva_utils.recipe import NETWORKS, build_model, norm_layer

ASSIGNMENT_TABLE = (Path(__file__).parent / "data" / "assignment_summary.txt").read_text()


@pytest.mark.parametrize("norm", ["bn", "gbn"])
def test_resnet18_has_the_pytorch_cifar_parameter_count(norm):
    assert count_parameters(resnet18(norm_layer=norm_layer(norm))) == 11_173_962
    assert count_parameters(resnet18(norm_layer=norm_layer(norm), dropout=0.1)) == 11_173_962


def test_resnet34_has_the_pytorch_cifar_parameter_count():
    assert count_parameters(resnet34()) == 21_282_122


def test_the_small_network_of_the_mechanics_tests_has_resnet18s_layers_at_a_34th_of_the_work():
    """resnet_tiny (config arch "tiny"): one BasicBlock a stage, 16 to 128 channels, with the
    norm layer and dropout it is given, as ResNet18 has them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(get_preset("session8").replace(arch="tiny"))
    assert count_parameters(model) == count_parameters(resnet_tiny()) == 308_826
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, GhostBatchNorm2d) and m.num_splits == 2 for m in norms)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.1 for m in model.modules()) == 4
    work = []
    for network in (resnet_tiny(), resnet18()):
        with FlopCounterMode(display=False) as counter:
            network(torch.zeros(1, 3, 32, 32))
        work.append(counter.get_total_flops())
    assert 30 < work[1] / work[0] < 40
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_torchsummary_prints_the_assignment_table_byte_for_byte(capsys):
    torchsummary.summary(resnet18(), (3, 32, 32), device="cpu")
    assert capsys.readouterr().out == ASSIGNMENT_TABLE


def test_library_summary_is_the_assignment_table():
    assert summary(resnet18()) == ASSIGNMENT_TABLE


def test_cli_summary_prints_the_assignment_table():
    result = subprocess.run(
        [sys.executable, "-m", "eva_utils", "summary"], capture_output=True, text=True, check=True
    )
    assert result.stdout == ASSIGNMENT_TABLE


def test_session8_model_really_has_gbn_and_dropout():
    """The original trained plain BatchNorm without dropout while claiming both."""
    model = build_model(get_preset("session8"))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(m, GhostBatchNorm2d) for m in norms)
    assert all(m.num_splits == 2 for m in norms)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 8 and all(m.p == 0.10 for m in dropouts)
    table = summary(model)
    assert "GhostBatchNorm2d" in table and "Dropout" in table
    assert "Total params: 11,173,962" in table


@pytest.mark.parametrize("training", [True, False])
def test_summary_leaves_the_model_state_untouched(training):
    """Printing the summary used to run a training-mode forward pass that moved the BN stats."""
    model = resnet18(norm_layer=norm_layer("gbn"), dropout=0.1).train(training)
    before = copy.deepcopy(model.state_dict())
    rng_before = torch.get_rng_state()
    summary(model)
    assert model.training is training
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_logits_have_one_score_per_class():
    model = resnet18(num_classes=7).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)


def test_dropout_sits_between_the_two_convolutions_of_each_block():
    block = resnet18(dropout=0.5).layer1[0]
    order = [name for name, _ in block.named_children()]
    assert order.index("conv1") < order.index("dropout") < order.index("conv2")


def test_zero_dropout_adds_no_module():
    assert not any(isinstance(m, nn.Dropout) for m in resnet18(dropout=0.0).modules())


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="norm must be bn or gbn"):
        norm_layer("layer")


def test_every_architecture_the_config_accepts_is_a_network_of_the_recipe():
    assert tuple(NETWORKS) == ARCHITECTURES


def test_dropout_outside_zero_to_one_is_rejected():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        resnet18(dropout=1.5)


PACKAGE = Path(__file__).resolve().parents[1] / "eva_utils"


@pytest.mark.parametrize("name", ["model.py", "gbn.py"])
def test_the_teaching_files_import_nothing_from_the_package(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                if node.level > 0 or (node.module or "").startswith("eva_utils")]  # fmt: skip
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names if alias.name.startswith("eva_utils")]  # fmt: skip
    assert imported == []


def test_the_teaching_files_copied_alone_build_the_assignments_network(tmp_path):
    """model.py and gbn.py as a student copies them: two files in a folder, no eva_utils."""
    for name in ("model.py", "gbn.py"):
        (tmp_path / name).write_text((PACKAGE / name).read_text())
    script = (
        "from functools import partial; import model, gbn\n"
        "net = model.resnet18(norm_layer=partial(gbn.GhostBatchNorm2d, num_splits=2))\n"
        "print(sum(p.numel() for p in net.parameters()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "11173962"
