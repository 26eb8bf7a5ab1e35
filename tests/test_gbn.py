"""GhostBatchNorm2d against an independent reference: F.batch_norm applied to each ghost batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eva_utils import GhostBatchNorm2d, resnet18
from eva_utils.recipe import norm_layer


def reference(x, gbn: GhostBatchNorm2d, num_splits: int):
    """Per-ghost-batch F.batch_norm with fresh copies of the running stats, then their mean."""
    outs, means, variances = [], [], []
    for ghost in x.tensor_split(num_splits):
        mean, var = gbn.running_mean.clone(), gbn.running_var.clone()
        outs.append(
            F.batch_norm(ghost, mean, var, gbn.weight, gbn.bias, True, gbn.momentum, gbn.eps)
        )
        means.append(mean)
        variances.append(var)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(variances).mean(0)


def make_gbn(num_splits=2, channels=4, seed=0):
    torch.manual_seed(seed)
    gbn = GhostBatchNorm2d(channels, num_splits=num_splits)
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 1.5)
        gbn.bias.uniform_(-0.5, 0.5)
    return gbn


def test_each_ghost_batch_is_normalised_with_its_own_statistics():
    gbn = GhostBatchNorm2d(4, num_splits=2)  # weight 1, bias 0: the output is the normalised input
    x = torch.randn(8, 4, 5, 5)
    x[4:] = x[4:] * 3 + 2  # the two halves have different statistics
    for half in gbn(x).tensor_split(2):  # each comes out with zero mean and unit variance
        torch.testing.assert_close(half.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
        variance = half.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(variance, torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("batch", [8, 7, 3])
def test_output_and_running_stats_match_the_reference(batch):
    gbn = make_gbn(num_splits=2)
    x = torch.randn(batch, 4, 6, 6) * 2 + 1
    expected, mean, var = reference(x, gbn, 2)
    torch.testing.assert_close(gbn(x), expected)
    torch.testing.assert_close(gbn.running_mean, mean)
    torch.testing.assert_close(gbn.running_var, var)
    assert int(gbn.num_batches_tracked) == 1


def test_gradients_match_the_reference():
    gbn = make_gbn(num_splits=4)
    x = torch.randn(16, 4, 3, 3, requires_grad=True)
    gbn(x).square().sum().backward()
    grad, weight_grad = x.grad.clone(), gbn.weight.grad.clone()
    x.grad = None
    ref = make_gbn(num_splits=4)
    reference(x, ref, 4)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, grad)
    torch.testing.assert_close(ref.weight.grad, weight_grad)


def test_eval_uses_running_stats():
    gbn = make_gbn()
    for _ in range(5):
        gbn(torch.randn(8, 4, 5, 5) * 2 + 3)
    gbn.eval()
    x = torch.randn(6, 4, 5, 5)
    expected = F.batch_norm(
        x, gbn.running_mean, gbn.running_var, gbn.weight, gbn.bias, False, 0.0, gbn.eps
    )
    torch.testing.assert_close(gbn(x), expected)
    # eval output of one image does not depend on the rest of the batch
    torch.testing.assert_close(gbn(x[:1]), expected[:1])


def test_one_split_equals_batchnorm2d():
    torch.manual_seed(0)
    gbn, bn = GhostBatchNorm2d(4, num_splits=1), nn.BatchNorm2d(4)
    bn.load_state_dict(gbn.state_dict())
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(gbn(x), bn(x))
    torch.testing.assert_close(gbn.state_dict(), bn.state_dict())


def test_state_dict_has_batchnorm2d_keys_and_shapes():
    gbn, bn = GhostBatchNorm2d(16, num_splits=4), nn.BatchNorm2d(16)
    assert {k: v.shape for k, v in gbn.state_dict().items()} == {
        k: v.shape for k, v in bn.state_dict().items()
    }


def test_gbn_trained_checkpoint_loads_into_a_plain_bn_resnet18():
    trained = resnet18(norm_layer=norm_layer("gbn")).train()
    trained(torch.randn(4, 3, 32, 32))  # move the running stats
    plain = resnet18()
    plain.load_state_dict(trained.state_dict())  # strict: same keys and shapes
    trained.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), trained(x))


@pytest.mark.parametrize("batch", [1, 3])
def test_batches_smaller_or_uneven_work(batch):
    gbn = make_gbn(num_splits=4)
    out = gbn(torch.randn(batch, 4, 5, 5))
    assert out.shape == (batch, 4, 5, 5) and torch.isfinite(out).all()
    assert torch.isfinite(gbn.running_var).all()


def test_momentum_none_is_a_cumulative_average():
    gbn = GhostBatchNorm2d(2, num_splits=2, momentum=None)
    first, second = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3) + 5
    _, mean1, _ = reference(first, GhostBatchNorm2d(2, momentum=1.0), 2)
    _, mean2, _ = reference(second, GhostBatchNorm2d(2, momentum=1.0), 2)
    gbn(first), gbn(second)
    torch.testing.assert_close(gbn.running_mean, (mean1 + mean2) / 2)


@pytest.mark.parametrize("num_splits", [0, -1, 1.5])
def test_invalid_num_splits_is_rejected(num_splits):
    with pytest.raises(ValueError, match="num_splits"):
        GhostBatchNorm2d(4, num_splits=num_splits)
