"""The model zoo: the paper's network and the CIFAR nets users train, one file per family.

``create_model(name, num_classes=10, width=1.0, gated=False)`` builds any of :data:`MODELS`;
``convert_to_gated(model)`` puts the paper's gated layer into any of them (or any other net).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from ..layers import GatedConv2d
from .coates import SingleLayerNet, coates, coates_triangle, fit_whitening_
from .mobilenet import MobileNetV2, mobilenetv2
from .paper import CONV_SPEC, HIDDEN, PaperNet, count_parameters, matching_width
from .resnet import CifarResNet, resnet20, resnet56
from .vgg import VGG, vgg11

__all__ = [
    "MODELS", "create_model", "convert_to_gated", "PaperNet", "CifarResNet", "VGG", "MobileNetV2", "SingleLayerNet",
    "fit_whitening_", "count_parameters", "matching_width", "CONV_SPEC", "HIDDEN",
]

#: name -> constructor taking ``num_classes``, ``width``, ``in_channels``, ``device``, ``dtype``.
MODELS = {
    "paper": PaperNet,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg11": vgg11,
    "mobilenetv2": mobilenetv2,
    "coates": coates,
    "coates-triangle": coates_triangle,
}

#: models that can be built without BN (``batch_norm=False``): the nets where an init's scale matters.
NO_BN = ("paper", "resnet20", "resnet56", "vgg11", "coates")


def create_model(name: str, num_classes: int = 10, width: float = 1.0, gated: bool = False, *,
                 in_channels: int = 3, device=None, dtype=None, batch_norm: bool = True,
                 patch_norm: bool = False) -> nn.Module:
    """A zoo model by name (see :data:`MODELS`); ``gated=True`` makes its k x k convs (k > 1) gated;
    ``batch_norm=False`` (PaperNet, the ResNets, VGG-11, the single-layer net) builds it without BN layers;
    ``patch_norm=True`` (the single-layer net only) contrast-normalizes each patch before its filters."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if patch_norm and name != "coates":
        raise ValueError(f"patch_norm=True is offered for 'coates' only, not {name!r}")
    if name == "paper":  # PaperNet builds its gated form itself (the reference layout of Table 1)
        return PaperNet(num_classes, width, gated, in_channels, device=device, dtype=dtype, batch_norm=batch_norm)
    if not batch_norm and name == "coates-triangle":
        raise ValueError("coates-triangle has no BN layers (its triangle encoder normalizes every patch); "
                         "leave batch_norm at its default")
    if not batch_norm and name not in NO_BN:
        raise ValueError(f"batch_norm=False is offered for {', '.join(NO_BN)} only; {name!r} is built with its BN layers")
    kw = {} if batch_norm else dict(batch_norm=False)  # the other constructors take no batch_norm
    if patch_norm:
        kw["patch_norm"] = True
    model = MODELS[name](num_classes=num_classes, width=width, in_channels=in_channels, device=device, dtype=dtype, **kw)
    return convert_to_gated(model, inplace=True) if gated else model


def _gated_copy(conv: nn.Conv2d) -> GatedConv2d:
    w = conv.weight
    return GatedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                       padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)


def convert_to_gated(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself with ``inplace``) in which every ``nn.Conv2d`` with a
    kernel larger than 1x1 is a :class:`GatedConv2d` with the same arguments (eq. 2 of Zhou).

    The gated layers are freshly initialized (PyTorch's default, like any new layer): initialize the
    converted model afterwards. 1x1 convs (projections, expansions) stay plain; so do convs that are
    already gated.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    todo = [(parent, name, child) for parent in out.modules() for name, child in parent.named_children()
            if type(child) is nn.Conv2d and any(k > 1 for k in child.kernel_size)]
    for parent, name, child in todo:
        setattr(parent, name, _gated_copy(child))
    return out
