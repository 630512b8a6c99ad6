"""MobileNetV2 (Sandler et al. 2018, *Inverted Residuals and Linear Bottlenecks*) for 32x32 images.

Each block: 1x1 expansion (x ``t``) + BN + ReLU6, 3x3 depthwise conv (``groups`` = channels) + BN +
ReLU6, 1x1 linear projection + BN; an identity shortcut where stride is 1 and widths match. The
ImageNet table of the paper, with the usual CIFAR strides: the stem and the second stage keep
stride 1, so the 32x32 input ends at 4x4 (as ImageNet's 224 ends at 7). ``width`` multiplies every
width (the last conv keeps at least 1280 only at width >= 1, as in the paper).
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["MobileNetV2", "mobilenetv2", "MBV2_CFG"]

#: (expansion t, output channels c, blocks n, stride of the first block s)
MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _w(c: float) -> int:
    # Channels rounded to a multiple of 8 (the paper's code), at least 8.
    return max(8, int(c + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int, **kw) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False, **kw), nn.BatchNorm2d(hidden, **kw), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False, **kw),
                   nn.BatchNorm2d(hidden, **kw), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False, **kw), nn.BatchNorm2d(cout, **kw)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, device=None, dtype=None) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        kw = dict(device=device, dtype=dtype)
        c = _w(32 * width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False, **kw),
                                   nn.BatchNorm2d(c, **kw), nn.ReLU6(inplace=True)]
        for t, base, n, s in MBV2_CFG:
            out = _w(base * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t, **kw))
                c = out
        last = _w(1280 * max(1.0, width))
        layers += [nn.Conv2d(c, last, 1, bias=False, **kw), nn.BatchNorm2d(last, **kw), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes, **kw)
        self.num_classes, self.width = num_classes, width

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def mobilenetv2(**kw) -> MobileNetV2:
    return MobileNetV2(**kw)
