"""The spherical k-means objective (eq. 3) and the cosine penalty (eqs. 4-6), in convolution form.

A layer's response at one position *is* the dot product of one input patch with each filter, so

    kmeans_objective(x, layer) = reduce(max over filters of conv(x, w / ||w||))

needs no unfolded patch matrix. The same trick gives the Lloyd step: the gradient of
``sum(mask * conv(x, w))`` with respect to ``w`` is, for each filter, the mask-weighted sum of the
patches it sees, so a one-hot assignment mask yields each cluster's sum of assigned patches as one
conv weight-gradient (:func:`masked_patch_sums`).

Filters are grouped into *banks*: every filter of a layer forms one bank, except for grouped
convolutions, where each group (which sees only its own input channels) is a bank of its own.
For :class:`~kmeansinit.layers.GatedConv2d` the gate and both value kernels share the bank.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import GatedConv2d

__all__ = [
    "SUPPORTED_LAYERS",
    "is_supported",
    "cosine_penalty",
    "kmeans_objective",
    "filter_responses",
    "masked_patch_sums",
    "patch_sq_norms",
    "patch_sums",
    "unit_filters",
]

SUPPORTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_EPS = 1e-12


def is_supported(module: nn.Module) -> bool:
    """True for the layer types whose weights k-means can set (conv 1/2/3-d, gated conv, linear)."""
    return isinstance(module, SUPPORTED_LAYERS)


def _check_layer(layer: nn.Module) -> None:
    if not is_supported(layer):
        raise TypeError(
            f"unsupported layer {type(layer).__name__}: expected one of "
            + ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        )


def unit_filters(weight: Tensor) -> Tensor:
    """``weight`` with every filter (row of ``weight.flatten(1)``) scaled to unit L2 norm; zero stays zero."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(_EPS)
    return weight / norms.reshape(-1, *([1] * (weight.dim() - 1)))


def num_banks(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def filter_responses(x: Tensor, layer: nn.Module, weight: Tensor | None = None, normalize: bool = True) -> Tensor:
    """Dot products of every input patch with every filter, shape ``(N, banks, filters_per_bank, positions)``.

    ``weight`` (layer layout, default ``layer.weight``) is normalized per filter when ``normalize``.
    The result is linear in ``weight`` when ``normalize=False``; bias is never added.
    """
    _check_layer(layer)
    w = layer.weight if weight is None else weight
    if normalize:
        w = unit_filters(w)
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return (rows @ w.t()).reshape(rows.shape[0], 1, w.shape[0], 1)
    if isinstance(layer, GatedConv2d):
        w = layer.conv_weight(w)
    out = layer._conv_forward(x, w, None)
    return out.reshape(out.shape[0], layer.groups, w.shape[0] // layer.groups, -1)


def kmeans_objective(x: Tensor, layer: nn.Module, reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Eq. 3 for one layer: ``reduce_i max_k <x_i, w_k / ||w_k||>`` over every patch the layer sees.

    Patches are those of the layer's own convolution (stride, padding and padding mode, dilation);
    for ``nn.Linear`` each input row is one patch. ``reduction`` is ``"mean"`` (the authors' code)
    or ``"sum"`` (the paper). With ``groups > 1`` each group is its own bank and the reduction runs
    over patches and groups. Bias is not part of the objective.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    best = filter_responses(x, layer, weight).amax(dim=2)
    return best.mean() if reduction == "mean" else best.sum()


def cosine_penalty(weight: Tensor) -> Tensor:
    """Eq. 4 for one layer: ``0.5 * sum_{i<j} cos(w_i, w_j)^2`` over the rows of ``weight.flatten(1)``.

    A zero filter has cosine 0 with every other filter (no NaN, in value or gradient).
    """
    w = weight.flatten(1)
    # Dividing by a clamped norm (not F.normalize's norm-then-clamp) keeps the gradient finite at w = 0.
    sq = (w * w).sum(dim=1, keepdim=True)
    wn = w * torch.rsqrt(sq.clamp_min(_EPS * _EPS))
    gram = wn @ wn.t()
    off = gram.square().sum() - gram.diagonal().square().sum()
    return 0.25 * off  # 0.5 * sum_{i<j} == 0.25 * sum_{i != j}


def _conv_geometry(x: Tensor, layer: nn.Module) -> tuple[Tensor, list[int]]:
    """``x`` padded as the layer's forward pads it when that is not plain zero padding, and the
    padding left for the convolution itself (as ``_conv_forward`` does)."""
    d = x.dim() - 2
    pad = layer.padding
    if pad == "valid":
        return x, [0] * d
    if layer.padding_mode != "zeros" or isinstance(pad, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), [0] * d
    return x, list(pad)


def masked_patch_sums(x: Tensor, layer: nn.Module, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """For every filter ``k``: ``sum_i mask[i, k] * patch_i``, in the layer's weight layout.

    ``mask`` has the shape of :func:`filter_responses`. Computed as the weight-gradient of the
    convolution (no unfold), by the convolution's backward kernel alone: going through autograd
    would first run the forward convolution, a third of the cost, only to throw it away.
    ``weight`` only fixes shape, dtype and device; its values do not matter.
    """
    _check_layer(layer)
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return mask.reshape(rows.shape[0], -1).to(rows.dtype).t() @ rows
    wc = layer.conv_weight(w) if isinstance(layer, GatedConv2d) else w
    inp, pad = _conv_geometry(x.detach(), layer)
    spatial = [
        (n + 2 * p - dl * (k - 1) - 1) // s + 1
        for n, p, dl, k, s in zip(inp.shape[2:], pad, layer.dilation, wc.shape[2:], layer.stride)
    ]
    grad_out = mask.to(inp.dtype).reshape(mask.shape[0], -1, *spatial)
    d = len(spatial)
    grad = torch.ops.aten.convolution_backward(
        grad_out, inp, wc.detach(), None, list(layer.stride), pad, list(layer.dilation), False, [0] * d,
        layer.groups, [False, True, False])[1]
    if isinstance(layer, GatedConv2d) and layer.groups > 1:
        # conv layout (g, 3, o) back to the layer's (3, g, o): the inverse of conv_weight.
        g, o = layer.groups, layer.out_channels // layer.groups
        grad = grad.reshape(g, 3, o, *grad.shape[1:]).transpose(0, 1).reshape(grad.shape)
    return grad


def _window_sums(z: Tensor, layer: nn.Module) -> Tensor:
    """Sum of ``z`` (one channel per bank) over every patch window of ``layer``: ``(N, banks, 1, positions)``."""
    g = layer.groups
    ones = z.new_ones(g, 1, *layer.weight.shape[2:])
    out = layer._conv_forward(z, ones, None)
    return out.reshape(out.shape[0], g, 1, -1)


def patch_sq_norms(x: Tensor, layer: nn.Module) -> Tensor:
    """Squared L2 norm of every patch, shape ``(N, banks, 1, positions)``.

    Channels are summed first, then a box filter sums the window: ``C + k^2`` operations per
    position instead of the ``C k^2`` of a convolution of ``x**2`` with a ones filter.
    """
    return patch_sums(x.square(), layer)


def patch_sums(x: Tensor, layer: nn.Module) -> Tensor:
    """Sum of the entries of every patch, shape ``(N, banks, 1, positions)`` (as :func:`patch_sq_norms`)."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows.sum(dim=1).reshape(-1, 1, 1, 1)
    return _window_sums(x.reshape(x.shape[0], layer.groups, -1, *x.shape[2:]).sum(dim=2), layer)
