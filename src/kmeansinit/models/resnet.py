"""CIFAR ResNets of He et al. (2016), *Deep Residual Learning for Image Recognition*, sec. 4.2.

A 3x3 conv of 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64 channels (the
last two start with stride 2), global average pooling and one linear layer: ``6n + 2`` layers
(ResNet-20: n = 3, 0.27M parameters; ResNet-56: n = 9, 0.85M, as published). Where a block changes
width or resolution, its shortcut is the paper's option A: the input subsampled by 2 and padded with
zero channels, so the published parameter counts hold (no 1x1 projection parameters).

``batch_norm=False`` drops every BN layer (each conv then carries a bias; the BN attributes are
``nn.Identity``): a residual net in which nothing renormalizes the activations, so the init's scale
is the forward pass's scale. Each block adds its branch to the shortcut, so with an init that keeps
each conv's output variance (He's) the variance about doubles block by block; Fixup (Zhang et al.
2019) trains such nets by scaling the branches down instead.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CifarResNet", "resnet20", "resnet56"]


def _width(c: int, width: float) -> int:
    return max(1, round(c * width))


def _norm(c: int, batch_norm: bool, **kw) -> nn.Module:
    # Identity keeps the module names (bn1, bn2) of the net with BN, so the two read alike.
    return nn.BatchNorm2d(c, **kw) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (without BN: conv3x3 with a bias)."""

    def __init__(self, cin: int, cout: int, stride: int, batch_norm: bool = True, **kw) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm, **kw)
        self.bn1 = _norm(cout, batch_norm, **kw)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not batch_norm, **kw)
        self.bn2 = _norm(cout, batch_norm, **kw)
        self.stride, self.extra = stride, cout - cin
        # Networks side by side along the channel axis (kmeansinit.stacked): each pads its own channels.
        self.cells = 1

    def shortcut(self, x: Tensor) -> Tensor:
        # Option A: no parameters; subsample, then zero channels split on both sides.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra and self.cells == 1:  # one net: the plain 4-d pad; the 5-d path below is for stacks
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        elif self.extra:
            b, c, h, w = x.shape
            x = x.reshape(b, self.cells, c // self.cells, h, w)
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2)).reshape(b, -1, h, w)
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images; ``width`` multiplies every channel count; ``batch_norm=False``
    builds it without BN layers (a bias per conv)."""

    def __init__(self, n: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 device=None, dtype=None, batch_norm: bool = True) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {n}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        kw = dict(device=device, dtype=dtype)
        c = _width(16, width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=not batch_norm, **kw)
        self.bn1 = _norm(c, batch_norm, **kw)
        stages = []
        for i, base in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                cout = _width(base, width)
                blocks.append(BasicBlock(c, cout, 2 if (i > 0 and j == 0) else 1, batch_norm, **kw))
                c = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes, **kw)
        self.num_classes, self.width, self.batch_norm = num_classes, width, batch_norm

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(**kw) -> CifarResNet:
    return CifarResNet(3, **kw)


def resnet56(**kw) -> CifarResNet:
    return CifarResNet(9, **kw)
