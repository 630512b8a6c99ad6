"""The single-layer network of Coates, Lee & Ng (AISTATS 2011), as a trainable PyTorch model.

Coates et al. learn 1,600 filters of 6 x 6 pixels by k-means on whitened patches, encode every
position of an image with them (stride 1), sum-pool each of the four quadrants and fit a linear
classifier to the 6,400 features: 77.9% on CIFAR-10 (79.6% with 4,000 filters), the classic case
where k-means filters beat random ones. Here the encoder is ``conv -> BN -> ReLU`` (BN's shift is the threshold of
their soft encoders), the pooling a 2 x 2 average, and the classifier a linear layer, so the same
net can be initialized by any method of :func:`kmeansinit.initialize_`, probed with its conv frozen
(:mod:`kmeansinit.probe`), or trained end to end.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["SingleLayerNet", "coates"]


class SingleLayerNet(nn.Module):
    """``conv(k x k, stride 1, no padding) -> BN -> ReLU -> 2 x 2 average pool -> linear``.

    ``filters`` (default 1,600, Coates et al.'s largest dictionary) is multiplied by ``width``
    (rounded, at least 1); ``kernel`` is the receptive field (6 in the paper). ``batch_norm=False``
    gives the conv a bias instead of the BN layer.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, *, filters: int = 1600,
                 kernel: int = 6, pool: int = 2, batch_norm: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if width <= 0 or filters < 1 or kernel < 1 or pool < 1:
            raise ValueError(f"width must be > 0 and filters, kernel, pool >= 1, got {width}, {filters}, {kernel}, {pool}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        kw = dict(device=device, dtype=dtype)
        k = max(1, round(filters * width))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, k, kernel, bias=not batch_norm, **kw),
            *([nn.BatchNorm2d(k, **kw)] if batch_norm else []),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool),  # quadrant pooling (Coates et al. sum; a mean is the same up to scale)
            nn.Flatten(),
        )
        self.classifier = nn.Linear(k * pool * pool, num_classes, **kw)
        self.num_classes, self.width, self.batch_norm = num_classes, width, batch_norm

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def coates(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, device=None, dtype=None,
           batch_norm: bool = True) -> SingleLayerNet:
    """Coates et al.'s single-layer net: 1,600 x ``width`` filters of 6 x 6, quadrant pooling."""
    return SingleLayerNet(num_classes, width, in_channels, batch_norm=batch_norm, device=device, dtype=dtype)
