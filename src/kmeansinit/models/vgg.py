"""VGG-11 with batch norm (Simonyan & Zisserman 2015, configuration A; BN after every conv as in
Ioffe & Szegedy 2015), with the usual CIFAR head: the five max-pools take 32x32 to 1x1, then one
linear layer on the 512 features (no 4096-wide FC layers, which only fit 224x224 inputs).
``batch_norm=False`` is the original VGG (each conv with a bias, no BN): the net in which an init's
scale decides whether training starts at all (Mishkin & Matas 2016 trained it with LSUV)."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["VGG", "vgg11", "VGG11_CFG"]

#: Configuration A: conv widths, "M" a 2x2 max-pool.
VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg=VGG11_CFG, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 device=None, dtype=None, batch_norm: bool = True) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        kw = dict(device=device, dtype=dtype)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, round(v * width))
            if batch_norm:  # BN's shift makes a conv bias redundant
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(out, **kw)]
            else:
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=True, **kw)]
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes, **kw)
        self.num_classes, self.width = num_classes, width

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg11(**kw) -> VGG:
    return VGG(VGG11_CFG, **kw)
