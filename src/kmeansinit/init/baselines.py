"""Baseline initializers (normal, Xavier, He) and data-dependent peers (LSUV, whitening).

Each sets the weights of every conv and linear layer of a model in place and zeros their biases.
"""
from __future__ import annotations

import math
import time
from collections.abc import Collection

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import GatedConv2d
from ..objectives import cosine_penalty
from ._model import Taps, batchnorm_train_mode, check_images, find_layers, forward_order, preserved_state
from .report import InitReport, LayerReport

__all__ = ["normal_", "xavier_", "he_", "lsuv_", "whitening_", "fans"]


def fans(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of one layer; a GatedConv2d counts as three convs of ``out_channels`` each."""
    w = module.weight
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    fan_in = w.shape[1] * receptive
    out = w.shape[0] // 3 if isinstance(module, GatedConv2d) else w.shape[0]
    return fan_in, out * receptive


def _report(method: str, layers: dict[str, nn.Module], start: float) -> InitReport:
    reps = [LayerReport(n, m.weight.shape[0], cosine_after=float(cosine_penalty(m.weight.detach()))) for n, m in layers.items()]
    return InitReport(method=method, layers=reps, seconds=time.perf_counter() - start)


def _normal(m: nn.Module, std: float, generator) -> None:
    # Drawn on the CPU and copied, so a seed gives the same weights on every device.
    m.weight.copy_(torch.empty(m.weight.shape, dtype=m.weight.dtype).normal_(0.0, std, generator=generator))


def _apply(model: nn.Module, method: str, fill) -> InitReport:
    start = time.perf_counter()
    layers = find_layers(model, include_linear=True)
    with torch.no_grad():
        for m in layers.values():
            fill(m)
            if m.bias is not None:
                m.bias.zero_()
    return _report(method, layers, start)


def normal_(model: nn.Module, std: float = 1e-3, generator: torch.Generator | None = None) -> InitReport:
    """Weights ~ N(0, std^2) (the paper's "N(0, 1e-3)": std 1e-3), biases 0."""
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return _apply(model, "normal", lambda m: _normal(m, std, generator))


def xavier_(model: nn.Module, gain: float = 1.0, generator: torch.Generator | None = None) -> InitReport:
    """Glorot & Bengio (2010), normal form: std = gain * sqrt(2 / (fan_in + fan_out)), biases 0."""

    def fill(m):
        fi, fo = fans(m)
        _normal(m, gain * math.sqrt(2.0 / (fi + fo)), generator)

    return _apply(model, "xavier", fill)


def he_(model: nn.Module, generator: torch.Generator | None = None) -> InitReport:
    """He et al. (2015), normal, fan-in mode for ReLU: std = sqrt(2 / fan_in), biases 0."""

    def fill(m):
        _normal(m, math.sqrt(2.0 / fans(m)[0]), generator)

    return _apply(model, "he", fill)


def lsuv_(model: nn.Module, images: Tensor, *, tol: float = 0.1, max_iters: int = 10, batch_size: int = 256,
          generator: torch.Generator | None = None, skip: Collection[str] = ()) -> InitReport:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016).

    Orthonormal weights, then, layer by layer in forward order, the weight is divided by the standard
    deviation of the layer's output on ``images[:batch_size]`` until that variance is within ``tol`` of 1
    (with a zero bias one division gets there). BN layers use batch statistics; running statistics and
    modes are restored afterwards. All layers are scaled in one forward pass.

    ``skip``: names of conv or linear layers (as ``model.named_modules()`` gives them) left exactly as
    they are, weights and biases; every later layer is scaled on the outputs they give.
    """
    start = time.perf_counter()
    images = check_images(images, min_count=2)
    layers = find_layers(model, include_linear=True)
    skip = set(skip)
    unknown = sorted(skip - set(layers))
    if unknown:
        raise ValueError(f"skip names {unknown[0]!r}, not a conv or linear layer of the model")
    layers = {n: m for n, m in layers.items() if n not in skip}
    batch = images[:batch_size]
    keep = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers if layers[n].bias is not None}
    with torch.no_grad():
        for m in layers.values():
            # float32: the QR behind orthogonal_ has no bf16/fp16 kernel; copy_ casts back. Drawn as
            # rows and copied by shape, so a channels-last weight (no flat view) takes it too.
            q = torch.empty(m.weight.shape[0], m.weight[0].numel(), dtype=torch.float32)
            nn.init.orthogonal_(q, generator=generator)
            m.weight.copy_(q.reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.zero_()
    reps = {}

    def scale_on_the_way(name, m):
        # One forward pass scales every layer in forward order: each layer's hook sees its input as
        # computed with every earlier layer already scaled, rescales its own weight and hands on the
        # rescaled output. The same as scaling layer by layer with a forward per layer (O(L^2) layer
        # evaluations; tests/test_init.py keeps that reference), at the cost of one forward.
        def hook(module, args, out):
            if name in reps:  # called again in the same pass (shared weights): scaled at its first call
                return None
            it = 0
            for it in range(1, max_iters + 1):
                var = float(out.var())
                if not math.isfinite(var) or var <= 0:
                    raise ValueError(f"layer {name}: output variance {var} on the LSUV batch; cannot scale")
                if abs(var - 1.0) < tol:
                    break
                m.weight.div_(math.sqrt(var))
                out = module.forward(*args)  # forward, not __call__: no hooks, no recursion
            reps[name] = LayerReport(name, m.weight.shape[0], cosine_after=float(cosine_penalty(m.weight)), steps=it)
            return out

        return hook

    with preserved_state(model, keep), batchnorm_train_mode(model), torch.no_grad():
        forward_order(model, layers, batch)  # warns of layers the forward never calls
        handles = [m.register_forward_hook(scale_on_the_way(n, m)) for n, m in layers.items()]
        try:
            with Taps(model, {}) as taps:  # only for its one-line error when the images do not fit
                taps.run(batch)
        finally:
            for h in handles:
                h.remove()
    reps = list(reps.values())
    return InitReport(method="lsuv", layers=reps, seconds=time.perf_counter() - start,
                      options=dict(tol=tol, max_iters=max_iters, batch_size=batch_size))


def patch_covariance(images: Tensor, kernel_size, dilation=1, chunk: int = 256) -> Tensor:
    """Covariance of all ``kernel_size`` patches (stride 1, no padding) of ``images``, shape ``(D, D)``."""
    d = None
    total, outer, count = None, None, 0
    for x in images.split(chunk):
        p = F.unfold(x.double(), kernel_size, dilation=dilation).transpose(1, 2).reshape(-1, x.shape[1] * math.prod(kernel_size))
        d = p.shape[1]
        total = p.sum(0) if total is None else total + p.sum(0)
        outer = p.t() @ p if outer is None else outer + p.t() @ p
        count += p.shape[0]
    mean = total / count
    return (outer / count - torch.outer(mean, mean)).reshape(d, d)


def whitening_(model: nn.Module, images: Tensor, *, eps: float = 5e-4, generator: torch.Generator | None = None) -> InitReport:
    """Patch-whitening init of the first conv layer (as in airbench, Jordan 2024); He init elsewhere.

    The first conv's filters are the top eigenvectors ``v`` of the covariance of its input patches
    scaled by ``1 / sqrt(eigenvalue + eps)``, each used together with its negative so that a ReLU
    passes both signs: filters ``[v_1 .. v_h, -v_1 .. -v_h]`` for ``h = out_channels / 2``.
    """
    start = time.perf_counter()
    images = check_images(images, min_count=2)
    he_(model, generator=generator)
    layers = find_layers(model)
    with torch.no_grad(), batchnorm_train_mode(model):
        first = forward_order(model, layers, images[:2])[0]
    m = layers[first]
    if not isinstance(m, nn.Conv2d) or isinstance(m, GatedConv2d) or m.groups != 1:
        raise ValueError(f"whitening init needs a plain ungrouped nn.Conv2d first layer, got {type(m).__name__} at {first}")
    if images.dim() != 4 or images.shape[1] != m.in_channels:
        raise ValueError(f"images of shape {tuple(images.shape)} do not fit {first} (in_channels={m.in_channels})")
    k = m.weight.shape[0]
    if k % 2:
        raise ValueError(f"whitening init pairs filters with their negatives: {first} needs an even out_channels, got {k}")
    cov = patch_covariance(images, m.kernel_size, m.dilation)
    if k // 2 > cov.shape[0]:
        raise ValueError(f"{first}: {k // 2} filter pairs but only {cov.shape[0]} patch dimensions")
    evals, evecs = torch.linalg.eigh(cov)
    top = evecs[:, -(k // 2):].flip(1).t()  # largest eigenvalues first
    vals = evals[-(k // 2):].flip(0).clamp_min(0)
    filt = (top / torch.sqrt(vals + eps)[:, None]).to(m.weight.dtype).reshape(k // 2, *m.weight.shape[1:])
    with torch.no_grad():
        m.weight.copy_(torch.cat([filt, -filt]))
    return _report("whitening", find_layers(model, include_linear=True), start)
