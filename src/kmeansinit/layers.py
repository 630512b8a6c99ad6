"""Gated convolution (Zhou, *Gated Convolutional Layers and Joint K-Means Weight Initialization*, eq. 2).

``psi = sigmoid(x * w1)``, ``y = psi * (x * w2) + (1 - psi) * (x * w3)``.

The three kernels live in one weight of ``3 * out_channels`` filters so that the layer runs as ONE
convolution (one im2col / one oneDNN call instead of three), and so that every tool that handles an
``nn.Conv2d`` (inits, optimizers, weight decay, k-means) handles the gated layer too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["GatedConv2d"]


class GatedConv2d(nn.Conv2d):
    """Gated 2-D convolution of eq. 2 of Zhou (UT Austin), computed as one convolution.

    Arguments mirror :class:`torch.nn.Conv2d`; ``out_channels`` is the number of *output* channels
    of the gated layer. ``weight`` has shape ``(3 * out_channels, in_channels // groups, kH, kW)``
    and ``bias`` ``(3 * out_channels,)``, ordered (gate ``w1``, value ``w2``, value ``w3``)::

        g, v1, v2 = conv(x).chunk(3, dim=1)       # three separate convolutions, conceptually
        y = sigmoid(g) * v1 + (1 - sigmoid(g)) * v2

    With ``groups > 1`` the three kernels of output channel ``i`` all see group ``i // (out_channels //
    groups)`` of the input, exactly like three ``nn.Conv2d(..., groups=groups)``; internally the
    filters are interleaved per group for the single convolution (see :meth:`conv_weight`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        super().__init__(
            in_channels, 3 * out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
            device=device, dtype=dtype,
        )
        # nn.Conv2d stored 3 * out_channels; the public attribute is the gated layer's width.
        self.out_channels = out_channels
        # A hook point for the pre-gate outputs: joint k-means reads its objective from them
        # instead of running the convolution a second time. No parameters, no state.
        self.pre_gate_tap = nn.Identity()

    def conv_weight(self, weight: Tensor | None = None) -> Tensor:
        """``weight`` laid out for one grouped convolution: group ``j`` holds ``(w1_j, w2_j, w3_j)``."""
        w = self.weight if weight is None else weight
        if self.groups == 1:
            return w
        g, o = self.groups, self.out_channels // self.groups
        return w.reshape(3, g, o, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

    def _ungroup_output(self, z: Tensor) -> Tensor:
        # Undo conv_weight's interleaving on the output channels: (N, g, 3, o, ...) -> (N, 3, g, o, ...).
        if self.groups == 1:
            return z
        n, g, o = z.shape[0], self.groups, self.out_channels // self.groups
        return z.reshape(n, g, 3, o, *z.shape[2:]).transpose(1, 2).reshape(z.shape)

    def pre_gate(self, x: Tensor) -> Tensor:
        """The ``3 * out_channels`` conv outputs ``(g, v1, v2)`` before gating, bias included."""
        if x.dim() == 3:
            return self.pre_gate(x.unsqueeze(0)).squeeze(0)
        bias = self.bias
        if bias is not None and self.groups > 1:
            bias = self.conv_weight(bias.reshape(-1, 1, 1, 1)).reshape(-1)
        return self._ungroup_output(self._conv_forward(x, self.conv_weight(), bias))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        z = self.pre_gate_tap(self.pre_gate(x))
        g, v1, v2 = z.chunk(3, dim=1)
        if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
            # A channel chunk of channels-last memory is strided, and sigmoid's CPU kernel is
            # ~10x slower on it (benchmarks/gated_and_flops.py profile): the gate gets a dense copy.
            g = g.contiguous(memory_format=torch.channels_last)
        psi = torch.sigmoid(g)
        # v2 + psi * (v1 - v2) == psi * v1 + (1 - psi) * v2 with one multiply fewer.
        return torch.lerp(v2, v1, psi)
