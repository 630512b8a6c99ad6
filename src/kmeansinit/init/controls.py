"""Controls that tell a k-means init's directions from its filter norms.

With BN after a conv, a filter's norm only sets its effective learning rate (``lr / ||w||^2``), so
an init can win by its norms alone. Each control keeps a k-means preset's per-layer norms and
replaces its directions by He-normal ones, on exactly the layers that preset clusters; every other
layer keeps its He init, as under the preset. Pair each with the preset at its own best rate: if the
control does as well, the preset's lead was its norms, not its k-means directions.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
from torch import Tensor

from ._model import find_layers
from .baselines import he_
from .kmeans import scale_filters_, unsupported_reason
from .report import InitReport

__all__ = ["he_kmeans_norm_", "he_variance_norm_"]


def _clustered(model: nn.Module, preset: dict) -> dict[str, nn.Module]:
    return {n: m for n, m in find_layers(model).items()
            if unsupported_reason(m, preset["preprocess"], preset["pairs"]) is None}


def he_kmeans_norm_(model: nn.Module, generator: torch.Generator | None = None) -> InitReport:
    """Control: He-normal directions, each conv filter rescaled to the norm the ``kmeans`` preset gives it.

    The counterpart of ``kmeans-he-norm``: random directions at the k-means preset's per-layer norms
    (Xavier-normal's expected norm, ``sqrt(2 fan_in / (fan_in + fan_out))``) on exactly the conv layers
    that preset clusters; every other layer keeps its He init, as under the preset.
    """
    from . import PRESETS

    report = he_(model, generator=generator)
    opts = PRESETS["kmeans"]
    with torch.no_grad():
        for m in _clustered(model, opts).values():
            scale_filters_(m.weight, opts["scale"], m)
    report.method = "he-kmeans-norm"
    return report


def he_variance_norm_(model: nn.Module, images: Tensor, generator: torch.Generator | None = None,
                      seed: int = 0, **options) -> InitReport:
    """Control for ``kmeans-variance``: He-normal directions at the filter norms that preset gives.

    ``kmeans-variance`` (with ``seed`` and ``options``) runs on a copy of ``model``; then ``model``
    gets a He-normal init from ``generator``, and every filter of each layer that preset clusters is
    rescaled to the norm of the same filter in the copy (the preset calibrates whole layers, so one
    norm a layer): ``w_k <- w_k * ||v_k|| / ||w_k||``. So the two inits share every filter norm, hence
    every BN layer's effective learning rate, and differ in the clustered layers' directions only.
    The report is He's, with the preset's skipped layers and options, and the seconds of the whole control.
    """
    from . import initialize_

    start = time.perf_counter()
    probe = copy.deepcopy(model)
    preset = initialize_(probe, "kmeans-variance", images, seed=seed, **options)
    report = he_(model, generator=generator)
    # The layers the preset set (its report's), not all it could: options such as layers=N narrow them.
    done = {r.name for r in preset.layers}
    probed, own = find_layers(probe), find_layers(model)
    with torch.no_grad():
        for name in done:
            w, v = own[name].weight, probed[name].weight
            ratio = v.flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
            w.mul_(ratio.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
    report.method, report.skipped, report.options = "he-variance-norm", dict(preset.skipped), dict(preset.options)
    report.seconds = time.perf_counter() - start
    return report
