"""Ghost Batch Normalization (Hoffer et al., 2017, "Train longer, generalize better").

A training batch of N images is cut into ``num_splits`` smaller "ghost" batches and each one is
normalised with its own mean and variance. The extra noise in the statistics acts as a
regulariser, which is why the assignment used it with large batches. In eval mode nothing changes:
the layer normalises with its running statistics, exactly like ``nn.BatchNorm2d``.

The notebook's section 4 shows :meth:`GhostBatchNorm2d.forward`. This file needs torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """A drop-in replacement for ``nn.BatchNorm2d`` that normalises ghost batches separately.

    Splitting rule: in training, the batch is cut with ``torch.tensor_split`` into
    ``min(num_splits, N)`` ghost batches whose sizes differ by at most one, so a batch that does
    not divide evenly (the last batch of an epoch, a batch of one) still works. Each ghost batch
    is normalised with its own statistics; the running mean and variance then move (with the
    usual ``momentum``) toward the average of the ghost batches' statistics.

    The parameters and buffers are exactly ``nn.BatchNorm2d``'s, so a checkpoint trained with
    ghost batches loads into a plain BatchNorm model and vice versa. With ``num_splits=1`` the
    layer is ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive integer, got {num_splits!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` of shape (N, C, H, W)."""
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        factor = self._update_factor()
        ghosts = x.tensor_split(min(self.num_splits, x.shape[0]))
        if self.running_mean is None:  # track_running_stats=False: nothing to update
            return torch.cat([self._normalise(g, None, None, factor) for g in ghosts])

        # F.batch_norm updates the buffers it is given in place; give each ghost batch its own
        # copy of the running statistics and average the updated copies afterwards.
        means = self.running_mean.expand(len(ghosts), -1).clone()
        variances = self.running_var.expand(len(ghosts), -1).clone()
        out = torch.cat(
            [self._normalise(g, means[i], variances[i], factor) for i, g in enumerate(ghosts)]
        )
        with torch.no_grad():
            self.running_mean.copy_(means.mean(0))
            self.running_var.copy_(variances.mean(0))
        return out

    def _normalise(
        self, x: Tensor, mean: Tensor | None, var: Tensor | None, factor: float
    ) -> Tensor:
        return F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)

    def _update_factor(self) -> float:
        """The exponential-average factor (``momentum=None``: a cumulative average)."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum
