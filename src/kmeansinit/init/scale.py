"""Final filter norms of a k-means init: data-free (unit, He, Xavier) or data-dependent (variance)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import all_reduce_, world
from ..objectives import filter_responses, unit_filters
from ._model import Taps
from .targets import _Target

SCALES = ("unit", "he", "xavier", "variance")


def filter_norm(module: nn.Module, scale: str) -> float:
    """Target norm of every filter of ``module`` for a data-free ``scale``."""
    from .baselines import fans

    if scale == "unit" or scale == "variance":  # variance: unit first, then calibrated on data
        return 1.0
    if scale == "he":
        return math.sqrt(2.0)
    if scale == "xavier":
        fi, fo = fans(module)
        return math.sqrt(2.0 * fi / (fi + fo))
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def scale_filters_(weight: Tensor, scale: str, module: nn.Module | None = None) -> Tensor:
    """Rescale every filter in place to the norm ``scale`` names (see :func:`kmeans_init_`).

    ``"he"``: sqrt(2), the expected norm of a He-normal filter (``E||w||^2 = fan_in * 2 / fan_in``),
    so k-means directions start training with the weight scale, hence the effective learning rate
    of BN-normalized layers, that the standard He init gives. ``"xavier"`` needs ``module``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "xavier" and module is None:
        raise ValueError("scale='xavier' needs the module (for its fans)")
    norm = filter_norm(module, scale)
    with torch.no_grad():
        weight.copy_(unit_filters(weight) * norm)
    return weight


def _calibrate_variance_(taps: Taps, images: Tensor, targets: list[_Target], weights: dict[str, Tensor],
                         batch_size: int, stepper=None) -> None:
    """Scale each target's filters, in forward order, so its output has unit variance on ``images``.

    With a :class:`~.lockstep.Lockstep` over ``images``, each layer's inputs come from it (each
    calibrated weight is then written into its module, so that the pass goes on with it); without
    one, from a forward pass up to the layer with every target at ``weights``.
    """
    chunks = list(images.split(batch_size))
    rank, size = world()
    for t in targets:
        stats = torch.zeros(3, dtype=torch.float64)
        if stepper is not None:
            xs = stepper.inputs(t.name)
        else:
            overrides = {f"{u.name}.weight": weights[u.name] for u in targets}
            xs = (taps.run(chunks[ci], overrides, stop_at=t.name)[t.name] for ci in range(rank, len(chunks), size))
        for x in xs:
            y = filter_responses(x, t.module, weights[t.name], normalize=False).double()
            stats += torch.tensor([float(y.sum()), float(y.square().sum()), y.numel()], dtype=torch.float64)
        total, sq, count = all_reduce_(stats).tolist()
        var = sq / count - (total / count) ** 2
        if not var > 0:
            raise ValueError(f"layer {t.name}: output variance {var} on the init images; cannot calibrate scale")
        weights[t.name] = weights[t.name] / math.sqrt(var)
        if stepper is not None:
            with torch.no_grad():
                t.module.weight.copy_(weights[t.name])


