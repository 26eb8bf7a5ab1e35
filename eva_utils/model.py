"""ResNet18/34 for 32x32 images, as in kuangliu/pytorch-cifar, with an injectable norm layer.

The notebook's section 4 shows this file. Differences from the ImageNet ResNet: a 3x3 stride-1
stem and no max-pool, so the four stages work at 32, 16, 8 and 4 pixels; a 4x4 average pool
feeds one Linear layer. ReLU and pooling are functional, so the torchsummary table lists exactly
the layers the assignment's table lists. Like torchvision's ``resnet.py`` this file needs torch
alone: copy it into a project of your own and ``resnet18(norm_layer=...)`` takes any norm layer
(:mod:`eva_utils.recipe` builds the recipe's, Ghost BatchNorm, from a config).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]  # num_features -> a norm layer (nn.BatchNorm2d's shape)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes).

    Dropout, when ``dropout > 0``, sits between the two convolutions, after the first ReLU, as in
    Wide ResNets (Zagoruyko & Komodakis, 2016). With ``dropout=0`` no Dropout module exists.
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                norm_layer(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages of BasicBlocks (``width`` x 1, 2, 4, 8 channels: 64, 128, 256, 512 in
    pytorch-cifar's networks), average pool, Linear."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        norm_layer: NormLayer = nn.BatchNorm2d,
        dropout: float = 0.0,
        width: int = 64,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        stage = partial(self._make_layer, norm_layer=norm_layer, dropout=dropout)
        self.layer1 = stage(width, num_blocks[0], stride=1)
        self.layer2 = stage(2 * width, num_blocks[1], stride=2)
        self.layer3 = stage(4 * width, num_blocks[2], stride=2)
        self.layer4 = stage(8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * BasicBlock.expansion, num_classes)

    def _make_layer(
        self, planes: int, num_blocks: int, stride: int, norm_layer: NormLayer, dropout: float
    ) -> nn.Sequential:
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, block_stride, norm_layer, dropout))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 32, 32) images -> (N, num_classes) logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


def resnet18(
    num_classes: int = 10, norm_layer: NormLayer = nn.BatchNorm2d, dropout: float = 0.0
) -> ResNet:
    """pytorch-cifar's ResNet18: 11,173,962 parameters for 10 classes, with any norm layer."""
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, dropout)


def resnet34(
    num_classes: int = 10, norm_layer: NormLayer = nn.BatchNorm2d, dropout: float = 0.0
) -> ResNet:
    """pytorch-cifar's ResNet34: 21,282,122 parameters for 10 classes."""
    return ResNet((3, 4, 6, 3), num_classes, norm_layer, dropout)


def resnet_tiny(
    num_classes: int = 10, norm_layer: NormLayer = nn.BatchNorm2d, dropout: float = 0.0
) -> ResNet:
    """Not the assignment's network: the same blocks, norm layers and dropout, one block a stage
    at a quarter of the width (16 to 128 channels): 308,826 parameters for 10 classes and 16
    million multiply-adds an image, a 34th of ResNet18's 555 million. For checks of the training
    machinery (resume, locks, signals, ranks) that take seconds on a CPU; nothing it learns
    says anything about ResNet18."""
    return ResNet((1, 1, 1, 1), num_classes, norm_layer, dropout, width=16)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
