"""Fixup (Zhang, Dauphin & Ma 2019, *Fixup Initialization: Residual Learning Without Normalization*).

A residual net without BN adds each branch's output to its shortcut, so an init that keeps every
conv's output variance (He's) lets the activations' variance grow block by block. Fixup rescales
instead of normalizing (its sec. 3, rules 1 and 2):

1. the classification layer and the last conv of every residual branch start at zero, so each
   block starts as its shortcut;
2. every other layer starts from He's init, and the weight layers inside a branch of ``m`` of
   them are scaled by ``L ** (-1 / (2m - 2))``, ``L`` the number of residual blocks.

Its rule 3, a scalar multiplier and scalar biases added to every branch, changes the architecture
and is left out: an init sets weights only (the nets without BN here carry a bias per conv instead).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from ._model import find_layers
from .baselines import _report, he_
from .report import InitReport

__all__ = ["fixup_", "residual_blocks"]


def residual_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The residual blocks of ``model``: each module with conv children ``conv1``, ``conv2`` (and
    ``conv3``, ...), as this zoo's and torchvision's BasicBlock and Bottleneck name them, mapped to
    those convs in order (the branch; a projection shortcut is not part of it). The model itself is
    never a block: a plain net whose own convs are named so (PyTorch's tutorial CNN) has none."""
    out = {}
    for name, m in model.named_modules():
        if not name:
            continue
        convs = []
        while isinstance(getattr(m, f"conv{len(convs) + 1}", None), nn.modules.conv._ConvNd):
            convs.append(getattr(m, f"conv{len(convs) + 1}"))
        if len(convs) >= 2:
            out[name] = convs
    return out


def fixup_(model: nn.Module, generator: torch.Generator | None = None) -> InitReport:
    """Fixup's init of a residual net in place (module docstring): He's init everywhere, then each
    block's last conv and the last linear layer (the classifier) at zero, and the block's other convs
    scaled by ``L ** (-1 / (2m - 2))``; biases 0. Blocks are found by :func:`residual_blocks`; a model
    without any raises ``ValueError``."""
    start = time.perf_counter()
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError("fixup needs residual blocks: modules with conv layers named conv1, conv2[, conv3 ...] "
                         f"(found none in {type(model).__name__})")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    he_(model, generator=generator)
    depth = len(blocks)
    with torch.no_grad():
        for convs in blocks.values():
            factor = depth ** (-1.0 / (2 * len(convs) - 2))
            for c in convs[:-1]:
                c.weight.mul_(factor)
            convs[-1].weight.zero_()
        if linears:
            linears[-1].weight.zero_()  # biases are zero already (he_)
    # he_'s own report is replaced: rule 1's zeros change the filters it describes.
    return _report("fixup", find_layers(model, include_linear=True), start)
