"""The single-layer network of Coates, Lee & Ng (AISTATS 2011), as a trainable PyTorch model.

Coates et al. learn 1,600 filters of 6 x 6 pixels by k-means on whitened patches, encode every
position of an image with them (stride 1), sum-pool each of the four quadrants and fit a linear
classifier to the 6,400 features: 77.9% on CIFAR-10 (79.6% with 4,000 filters), the classic case
where k-means filters beat random ones. Here the encoder is ``conv -> BN -> ReLU`` (BN's shift is the threshold of
their soft encoders), the pooling a 2 x 2 average, and the classifier a linear layer, so the same
net can be initialized by any method of :func:`kmeansinit.initialize_`, probed with its conv frozen
(:mod:`kmeansinit.probe`), or trained end to end. ``patch_norm=True`` contrast-normalizes every
input patch before the filters (:class:`PatchNormConv2d`), as Coates et al. do when they encode.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..objectives import patch_sq_norms, patch_sums

__all__ = ["SingleLayerNet", "PatchNormConv2d", "coates"]


class PatchNormConv2d(nn.Conv2d):
    """A conv of contrast-normalized patches: each input patch ``p`` (all ``C k k`` values under a
    filter) is replaced by ``(p - mean(p)) / sqrt(var(p) + eps)`` before the filters are applied.

    Coates, Lee & Ng (2011) normalize every patch's brightness and contrast this way both when they
    learn their k-means dictionary and when they encode an image with it. The k-means inits here
    learn on patches normalized the same way (with this layer's default ``eps``, 1e-2, the
    ``eps_norm`` of :class:`~kmeansinit.init.whiten.ZCASpace`) and map each centroid back to a raw filter ``w``, so
    that a plain conv ranks patches as the centroid does only up to each patch's contrast
    ``sqrt(var(p) + eps)``; this layer divides that contrast out. It is computed in convolution
    form, without a patch matrix: ``(conv(x, w) - mean(p) sum(w)) / sqrt(var(p) + eps) + b``, the
    patch moments by :func:`~kmeansinit.objectives.patch_sums` (as the init's own), in float32 at least (under
    bf16 autocast ``E[x^2] - E[x]^2`` would cancel to noise). The weight and bias are an
    ``nn.Conv2d``'s, so every init treats it as one (they see the raw input patches).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", eps: float = 1e-2,
                 device=None, dtype=None) -> None:
        if groups != 1:
            raise ValueError(f"PatchNormConv2d normalizes whole patches: groups must be 1, got {groups}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        d = w[0].numel()
        y = self._conv_forward(x, w, None)
        with torch.autocast(x.device.type, enabled=False):
            xm = x if x.dtype in (torch.float32, torch.float64) else x.float()
            shape = (y.shape[0], 1, *y.shape[2:])
            mean = patch_sums(xm, self).reshape(shape) / d  # (N, 1, H', W'): each patch's mean
            var = (patch_sq_norms(xm, self).reshape(shape) / d - mean.square()).clamp_min(0)
            scale = torch.rsqrt(var + self.eps)
        y = (y - (mean * w.sum(dim=(1, 2, 3)).reshape(1, -1, 1, 1)).to(y.dtype)) * scale.to(y.dtype)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class SingleLayerNet(nn.Module):
    """``conv(k x k, stride 1, no padding) -> BN -> ReLU -> 2 x 2 average pool -> linear``.

    ``filters`` (default 1,600, Coates et al.'s largest dictionary) is multiplied by ``width``
    (rounded, at least 1); ``kernel`` is the receptive field (6 in the paper). ``batch_norm=False``
    gives the conv a bias instead of the BN layer; ``patch_norm=True`` makes the conv a
    :class:`PatchNormConv2d` (each patch contrast-normalized first, as Coates et al. encode).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, *, filters: int = 1600,
                 kernel: int = 6, pool: int = 2, batch_norm: bool = True, patch_norm: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if width <= 0 or filters < 1 or kernel < 1 or pool < 1:
            raise ValueError(f"width must be > 0 and filters, kernel, pool >= 1, got {width}, {filters}, {kernel}, {pool}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        kw = dict(device=device, dtype=dtype)
        k = max(1, round(filters * width))
        conv = PatchNormConv2d if patch_norm else nn.Conv2d
        self.features = nn.Sequential(
            conv(in_channels, k, kernel, bias=not batch_norm, **kw),
            *([nn.BatchNorm2d(k, **kw)] if batch_norm else []),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool),  # quadrant pooling (Coates et al. sum; a mean is the same up to scale)
            nn.Flatten(),
        )
        self.classifier = nn.Linear(k * pool * pool, num_classes, **kw)
        self.num_classes, self.width, self.batch_norm, self.patch_norm = num_classes, width, batch_norm, patch_norm

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def coates(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, device=None, dtype=None,
           batch_norm: bool = True, patch_norm: bool = False) -> SingleLayerNet:
    """Coates et al.'s single-layer net: 1,600 x ``width`` filters of 6 x 6, quadrant pooling."""
    return SingleLayerNet(num_classes, width, in_channels, batch_norm=batch_norm, patch_norm=patch_norm,
                          device=device, dtype=dtype)
