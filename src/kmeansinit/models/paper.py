"""The network of Table 1 of the paper, with a width multiplier and a parameter-matching helper."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import GatedConv2d

__all__ = ["PaperNet", "count_parameters", "matching_width", "CONV_SPEC", "HIDDEN"]

#: (out_channels, kernel, stride) of the eight conv layers of Table 1.
CONV_SPEC = [(16, 11, 1), (16, 11, 2), (32, 5, 1), (32, 5, 2), (64, 3, 1), (64, 3, 1), (128, 3, 1), (128, 3, 1)]
#: widths of the two hidden fully connected layers.
HIDDEN = [128, 128]


class PaperNet(nn.Module):
    """Table 1 of Zhou: eight convs (each + BN + ReLU), global average pool, FC 128, FC 128, logits.

    "Same" padding is ``kernel // 2`` on every side, which gives TensorFlow's "same" output sizes
    (32, 16, 16, 8, 8, 8, 8, 8 on CIFAR) with symmetric padding. Convs and hidden FC layers carry no
    bias because the BN right after them cancels one. ``width`` multiplies every conv and hidden width
    (rounded, at least 1): ``width=3`` is the paper's "vanilla x3"; :func:`matching_width` finds the
    width whose parameter count matches another model. ``gated=True`` uses :class:`GatedConv2d`.
    ``batch_norm=False`` drops every BN layer (convs and hidden FC layers then carry a bias): the net
    where an init's scale matters, since nothing renormalizes the activations.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, gated: bool = False, in_channels: int = 3,
                 device=None, dtype=None, batch_norm: bool = True) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        kw = dict(device=device, dtype=dtype)
        conv = GatedConv2d if gated else nn.Conv2d
        layers: list[nn.Module] = []
        c = in_channels
        for out, k, s in CONV_SPEC:
            out = max(1, round(out * width))
            layers += [conv(c, out, k, stride=s, padding=k // 2, bias=not batch_norm, **kw)]
            layers += [nn.BatchNorm2d(out, **kw)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        for h in HIDDEN:
            h = max(1, round(h * width))
            head += [nn.Linear(c, h, bias=not batch_norm, **kw)] + ([nn.BatchNorm1d(h, **kw)] if batch_norm else [])
            head += [nn.ReLU(inplace=True)]
            c = h
        head.append(nn.Linear(c, num_classes, **kw))
        self.classifier = nn.Sequential(*head)
        self.num_classes, self.width, self.gated, self.batch_norm = num_classes, width, gated, batch_norm

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matching_width(target: int | nn.Module, *, gated: bool = False, num_classes: int = 10, in_channels: int = 3,
                   lo: float = 0.05, hi: float = 16.0) -> float:
    """The ``PaperNet`` width whose parameter count is closest to ``target`` (a count or a model).

    Example: ``matching_width(PaperNet(gated=True))`` is the width of the vanilla net with as many
    parameters as the gated one (about 1.7, not the paper's 3).
    """
    goal = count_parameters(target) if isinstance(target, nn.Module) else int(target)
    if goal < 1:
        raise ValueError(f"target parameter count must be >= 1, got {goal}")

    def params(w: float) -> int:
        with torch.device("meta"):
            return count_parameters(PaperNet(num_classes, w, gated, in_channels))

    for _ in range(60):  # bisection on a monotone count
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) < goal else (lo, mid)
    # Widths round to integers per layer, so check the neighbourhood for the closest count.
    cands = [round(x, 4) for x in (lo, hi)]
    return min(cands, key=lambda w: abs(params(w) - goal))
