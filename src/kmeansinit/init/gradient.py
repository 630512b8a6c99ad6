"""The joint objective (eqs. 3-5) through the whole model, and the gradient solver that maximizes it.

``_joint_terms`` runs the model once with the candidate filters and reads each layer's eq. 3 term off
its own output; ``_gradient_phase`` is the paper's solver (momentum SGD on every filter at once,
gradients through BN and ReLU) and our refinement (Adam, linear decay) after the Lloyd phase.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import all_reduce_, world
from ..layers import GatedConv2d
from ..objectives import cosine_penalty, unit_filters
from ._model import Taps, batchnorm_train_mode, check_images, find_layers, forward_order, preserved_state
from .targets import _Target, _target


def _responses_from_output(t: _Target, out: Tensor, w: Tensor) -> Tensor:
    """Eq. 3's dot products from the layer's own output: ``(out - bias) / ||w_k||``, in banks.

    The forward pass already computed ``conv(x, w)``; dividing by the filter norms gives the
    normalized-filter responses without a second convolution.
    """
    m = t.module
    norms = w.flatten(1).norm(dim=1).clamp_min(1e-12)
    if isinstance(m, nn.Linear):
        rows = out.reshape(-1, out.shape[-1])
        if m.bias is not None:
            rows = rows - m.bias
        return (rows / norms).reshape(rows.shape[0], 1, -1, 1)
    if m.bias is not None:
        out = out - m.bias.reshape(1, -1, *([1] * (out.dim() - 2)))
    out = out / norms.reshape(1, -1, *([1] * (out.dim() - 2)))
    if isinstance(m, GatedConv2d) and m.groups > 1:
        out = out[:, t.perm]  # layer layout -> bank-major conv layout
    return out.reshape(out.shape[0], t.banks, t.per_bank, -1)


def _joint_terms(taps: Taps, batch: Tensor, targets: list[_Target], weights: dict[str, Tensor], reduction: str):
    overrides = {f"{t.name}.weight": weights[t.name] for t in targets}
    taps.run(batch, overrides, stop_at=targets[-1].name)
    terms = []
    for t in targets:
        best = _responses_from_output(t, taps.outputs[t.name], weights[t.name]).amax(dim=2)
        terms.append(best.mean() if reduction == "mean" else best.sum())
    return terms


def _evaluate(taps, images, targets, weights, reduction, batch_size, cosine_weight):
    """Per-layer objectives (averaged over chunks of ``batch_size``), penalties, joint value."""
    chunks = list(images.split(batch_size))
    rank, size = world()
    totals = torch.zeros(len(targets), dtype=torch.float64)
    with torch.no_grad():
        for ci in range(rank, len(chunks), size):
            for i, v in enumerate(_joint_terms(taps, chunks[ci], targets, weights, reduction)):
                totals[i] += float(v) / len(chunks)
        totals = all_reduce_(totals).tolist()
        pens = [float(cosine_penalty(weights[t.name])) for t in targets]
    joint = sum(totals) - cosine_weight * sum(pens)
    return totals, pens, joint


def _gradient_phase(taps, images, targets, weights, *, steps, lr, optimizer, momentum, batch_size,
                    cosine_weight, reduction, renormalize, gen, bar, accumulate=1, history=None, decay=False):
    params = {t.name: weights[t.name].detach().clone().requires_grad_(True) for t in targets}
    if optimizer == "sgd":
        opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(list(params.values()), lr=lr)
    n = images.shape[0]
    bs = min(batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    rank, size = world()
    for step in range(steps):
        batches = []
        for _ in range(accumulate):
            if pos + bs > n:
                order, pos = torch.randperm(n, generator=gen), 0
            batches.append(order[pos:pos + bs])
            pos += bs
        for p in params.values():
            p.grad = torch.zeros_like(p)
        with torch.enable_grad():
            # Micro-batches (each its own BN batch) are shared out over ranks; gradients summed.
            value = torch.zeros((), dtype=torch.float64)
            for j in range(rank, accumulate, size):
                objs = _joint_terms(taps, images[batches[j].to(images.device)], targets, params, reduction)
                obj = -sum(objs)
                obj.backward()
                value += float(obj.detach())
            for p in params.values():
                all_reduce_(p.grad)
            if cosine_weight:
                pen = cosine_weight * sum(cosine_penalty(params[t.name]) for t in targets)
                pen.backward()
                value += float(pen.detach())
        loss = all_reduce_(value) if size > 1 else value
        if history is not None and (step % max(1, steps // 50) == 0 or step == steps - 1):
            history.append([step, -float(loss)])
        if decay:  # linear decay to 0: Adam settles instead of hovering at its step size
            for group in opt.param_groups:
                group["lr"] = lr * (1 - step / steps)
        opt.step()
        if renormalize:
            with torch.no_grad():
                for p in params.values():
                    p.copy_(unit_filters(p))
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"joint k-means loss became {float(loss)}; lower lr (now {lr})")
        bar.update(1)
    return {k: v.detach() for k, v in params.items()}



def joint_objective(model: nn.Module, images: Tensor, *, cosine_weight: float = 100.0, reduction: str = "sum",
                    batch_size: int = 64, layers=None, include_linear: bool = False) -> float:
    """The joint loss that joint k-means maximizes, for the model's current weights, on ``images``.

    ``sum_l objective_l - cosine_weight * sum_l cosine_penalty_l``, the objectives averaged over
    chunks of ``batch_size`` images (BN in train mode per chunk). The model is left unchanged.
    """
    images = check_images(images)
    found = find_layers(model, include_linear=include_linear, layers=layers)
    with preserved_state(model, set()), batchnorm_train_mode(model), torch.no_grad():
        order = forward_order(model, found, images[: min(batch_size, images.shape[0])])
        if isinstance(layers, int):
            order = order[:layers]
        targets = [_target(n, found[n]) for n in order]
        with Taps(model, {t.name: t.module for t in targets}, outputs=True) as taps:
            weights = {t.name: t.module.weight for t in targets}
            return _evaluate(taps, images, targets, weights, reduction, batch_size, cosine_weight)[2]


