"""N same-shaped networks trained as one: stacking by grouped convolution (the start of stacked cells).

``stack_models(models)`` returns one module whose every layer holds the N cells side by side along
the channel axis: a conv of ``groups=g`` becomes one conv of ``groups=N*g`` (cell ``i`` owns channels
``[i*C, (i+1)*C)`` of every activation), a batch norm over ``N*C`` channels (so each cell keeps its own
batch statistics and running averages, exactly), a linear layer a batched matrix product. The input
is the N cells' batches side by side, ``(B, N*C_in, H, W)``; the output ``(B, N*classes)``.

Why grouped convolutions and not ``torch.func`` (stack_module_state + vmap): under vmap, batch norm
cannot update its running statistics in place, and every zoo net has batch norm; grouped layers keep
plain modules, so the optimizer, bf16 autocast, DDP and checkpoints work unchanged. Each parameter
element belongs to one cell and SGD, momentum, weight decay and Adam are elementwise, so one optimizer
over the stacked parameters takes each cell's own step (with one learning rate for all).

Supported layers: Conv1d/2d/3d, GatedConv2d, BatchNorm1d/2d, Linear, and parameter-free per-channel
modules (ReLU, ReLU6, pooling, Flatten, Identity). A model with any other module with parameters is
refused. Forwards that act on the channel axis outside the layers must know the stack: the CIFAR
ResNet's zero-padded shortcut pads each cell's channels (``BasicBlock.cells``).

``stack_tensors`` / ``unstack_tensors`` move any per-parameter tensors (an optimizer's momentum or
Adam moments) between the cells' layout and the stack's, so a stacked run checkpoints each cell in
the same format as a run alone (``kmeansinit.train_stacked``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import GatedConv2d

__all__ = ["StackedLinear", "stack_models", "unstack_state", "stack_tensors", "unstack_tensors", "stacked_inputs",
           "stacked_loss"]

_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
                nn.Sequential)


class StackedLinear(nn.Module):
    """N linear layers side by side: input ``(B, N*in)``, output ``(B, N*out)``; weight ``(N, out, in)``."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n, out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("bni,noi->bno", x.reshape(x.shape[0], self.n, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape[0], -1)


_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, GatedConv2d.forward)


def _stack_layer(layers: list[nn.Module]) -> nn.Module:
    first, n = layers[0], len(layers)
    if any(type(m) is not type(first) for m in layers):
        raise ValueError(f"cells differ in layer type: {sorted({type(m).__name__ for m in layers})}")
    if isinstance(first, nn.modules.conv._ConvNd) and type(first).forward not in _CONV_FORWARDS:
        # A conv subclass with a forward of its own (kmeansinit.models.coates.PatchNormConv2d, a
        # user's) computes more than a grouped conv of the stacked weights would.
        raise ValueError(f"cannot stack {type(first).__name__}: its forward is not a plain or gated conv's")
    if isinstance(first, (nn.modules.conv._ConvNd, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)):
        # The layout of the stacked tensors is stack_tensors' alone (unstack_tensors inverts it).
        state = stack_tensors([m.state_dict() for m in layers], first)
        floats = [v for v in state.values() if v.is_floating_point()]
        kw = dict(device=floats[0].device, dtype=floats[0].dtype) if floats else {}
        if isinstance(first, nn.modules.conv._ConvNd):
            conv = copy.deepcopy(first)
            conv.in_channels, conv.out_channels, conv.groups = first.in_channels * n, first.out_channels * n, first.groups * n
            conv.weight = nn.Parameter(state["weight"])
            if first.bias is not None:
                conv.bias = nn.Parameter(state["bias"])
            return conv
        if isinstance(first, nn.Linear):
            layer = StackedLinear(n, first.in_features, first.out_features, first.bias is not None, **kw)
        else:
            layer = type(first)(first.num_features * n, eps=first.eps, momentum=first.momentum, affine=first.affine,
                                track_running_stats=first.track_running_stats, **kw)
        layer.load_state_dict(state)
        return layer
    if isinstance(first, _CHANNELWISE) and not list(first.parameters(recurse=False)):
        return copy.deepcopy(first)
    raise ValueError(f"cannot stack {type(first).__name__}: supported are convs, batch norms, linear layers "
                     f"and parameter-free per-channel modules")


def _tell_forwards(model: nn.Module, n: int) -> None:
    # Forwards that act on the whole channel axis outside the layers (zero-padded shortcuts) pad per cell.
    from .models.resnet import BasicBlock

    for m in model.modules():
        if isinstance(m, BasicBlock):
            m.cells = n


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One module computing ``len(models)`` same-shaped models side by side (see the module docstring)."""
    if len(models) < 1:
        raise ValueError("stack_models needs at least one model")
    out = copy.deepcopy(models[0])
    names = [n for n, _ in out.named_modules() if n]
    for other in models[1:]:
        if [n for n, _ in other.named_modules() if n] != names:
            raise ValueError("cells differ in structure; only same-shaped models stack")
    mods = [dict(m.named_modules()) for m in models]
    replaced: list[str] = []
    for name in names:
        leaf = mods[0][name]
        if not isinstance(leaf, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)) and \
                list(leaf.children()):
            continue  # containers stay; their leaves are replaced (a GatedConv2d, with its tap, is a leaf)
        if any(name.startswith(done + ".") for done in replaced):
            continue  # inside a layer already stacked whole
        replaced.append(name)
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, _stack_layer([m[name] for m in mods]))
    _tell_forwards(out, len(models))
    out.stack_size = len(models)
    return out


def unstack_state(stacked: nn.Module, like: nn.Module, n: int) -> list[dict]:
    """The N cells' state dicts (in ``like``'s layout) from a stacked module's state."""
    return unstack_tensors(stacked.state_dict(), like, n)


def unstack_tensors(named: dict[str, Tensor], like: nn.Module, n: int) -> list[dict]:
    """Tensors keyed by ``like``'s state-dict names, in the stack's layout, cut into the N cells' layouts."""
    ref = like.state_dict()
    mods = dict(like.named_modules())
    cells = [dict() for _ in range(n)]
    for key, value in named.items():
        owner = mods.get(key.rpartition(".")[0])
        if value.dim() == 0:  # num_batches_tracked: shared
            parts = [value.clone() for _ in range(n)]
        elif isinstance(owner, GatedConv2d):
            blocks = [b.chunk(n) for b in value.chunk(3)]
            parts = [torch.cat([blocks[b][i] for b in range(3)]) for i in range(n)]
        elif isinstance(owner, nn.Linear):
            parts = list(value.unbind(0))
        else:
            parts = list(value.chunk(n))
        for i in range(n):
            cells[i][key] = parts[i].clone().reshape(ref[key].shape)
    return cells


def stack_tensors(cells: list[dict[str, Tensor]], like: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`unstack_tensors`: the cells' tensors (keyed by ``like``'s state-dict names,
    each shaped like that entry) in the stack's layout. A 0-dim entry (``num_batches_tracked``) is
    shared and taken from the first cell."""
    mods = dict(like.named_modules())
    out = {}
    for key in cells[0]:
        owner = mods.get(key.rpartition(".")[0])
        values = [c[key] for c in cells]
        if values[0].dim() == 0:
            out[key] = values[0].clone()
        elif isinstance(owner, GatedConv2d):
            blocks = [v.chunk(3) for v in values]
            out[key] = torch.cat([torch.cat([b[k] for b in blocks]) for k in range(3)])
        elif isinstance(owner, nn.Linear):
            out[key] = torch.stack(values)
        else:
            out[key] = torch.cat(values)
    return out


def stacked_inputs(batches: list[Tensor]) -> Tensor:
    """The cells' batches side by side along the channel axis."""
    return torch.cat(batches, dim=1)


def stacked_loss(logits: Tensor, targets: list[Tensor]) -> Tensor:
    """Sum over cells of each cell's mean cross-entropy on its own batch (gradients never mix)."""
    parts = logits.reshape(logits.shape[0], len(targets), -1)
    return sum(F.cross_entropy(parts[:, i], y) for i, y in enumerate(targets))
