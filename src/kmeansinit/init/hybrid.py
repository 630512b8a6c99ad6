"""k-means where it is known to help, LSUV everywhere else (``kmeans-lsuv``, and its cheap form ``kmeans-fast``).

Whitened-patch k-means gives first layers filters like the ones training learns (Coates & Ng 2011);
deeper in a net it clusters ReLU features, and on VGG-11 and ResNet-20 the k-means presets at their
default whitening were not ahead of LSUV (docs/results/fair.md). This init keeps k-means directions in
the first ``layers`` layers (forward order; ``kmeans-variance``: each at unit output variance on the
images) and gives every other conv and linear layer LSUV (Mishkin & Matas 2016: orthonormal, then
unit output variance in forward order), computed on the outputs of the k-means layers in place.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch import Tensor

from .baselines import lsuv_
from .report import InitReport

__all__ = ["kmeans_lsuv_", "kmeans_fast_"]


def kmeans_lsuv_(model: nn.Module, images: Tensor, *, layers: int = 2, seed: int = 0,
                 generator: torch.Generator | None = None, lsuv_options: dict | None = None,
                 **options) -> InitReport:
    """k-means (``kmeans-variance``) in the first ``layers`` layers, LSUV in all the others; in place.

    ``options`` go to the k-means init (``seed``, ``progress``, ``stat_patches``, ...), ``lsuv_options``
    to :func:`~kmeansinit.init.baselines.lsuv_` (``tol``, ``max_iters``, ``batch_size``); ``generator``
    draws LSUV's orthonormal matrices (default: seeded by ``seed``). A layer among the first ``layers``
    that k-means cannot cluster (a depthwise conv under ZCA whitening) gets LSUV and is named in the
    report's ``skipped``. The report lists the k-means layers' records, then LSUV's; ``seconds`` is the
    whole init's.
    """
    from . import initialize_

    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int (the first N layers get k-means), got {layers!r}")
    start = time.perf_counter()
    # base=None: the layers past `layers` are set by LSUV below, so a He draw for them would be wasted.
    km = initialize_(model, "kmeans-variance", images, base=None, layers=layers, seed=seed, **options)
    clustered = [r.name for r in km.layers]
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    rest = lsuv_(model, images, generator=gen, skip=clustered, **(lsuv_options or {}))
    return InitReport(method="kmeans-lsuv", layers=km.layers + rest.layers, seconds=time.perf_counter() - start,
                      options=dict(km.options, layers=layers, lsuv=rest.options),
                      skipped={n: f"{why}; set by LSUV instead" for n, why in km.skipped.items()})


#: ``kmeans-fast``'s ZCA statistics: at most this many patches of its one k-means layer (an equal,
#: seeded random share of each image chunk). PaperNet's 11x11 first layer has 262,144 patches of 363
#: values on 256 images; a quarter of them still gives about 180 samples a dimension.
FAST_STAT_PATCHES = 2**16


def kmeans_fast_(model: nn.Module, images: Tensor, *, layers: int = 1, stat_patches: int | None = FAST_STAT_PATCHES,
                 seed: int = 0, generator: torch.Generator | None = None, lsuv_options: dict | None = None,
                 **options) -> InitReport:
    """The cheap k-means init (``kmeans-fast``): ``kmeans-variance`` in the first conv layer only, its ZCA
    statistics from at most ``stat_patches`` patches, LSUV in every other layer; in place.

    :func:`kmeans_lsuv_` with ``layers=1, stat_patches=2**16``, under its own name. The k-means
    presets spend most of their time on the ZCA statistics of wide deeper layers (PaperNet's
    1,936-dimensional second layer: 65,536 patches, a 1,936 x 1,936 eigendecomposition); the first
    layer's patches have few dimensions (363 in PaperNet, 27 in ResNet-20), so its statistics and Lloyd
    passes are cheap, and LSUV costs a few forward passes per layer. Cost: benchmarks/RESULTS.md, "Init
    cost against one training epoch"; accuracy: docs/results/fastinit and docs/results/fair.md.
    """
    # Its signature names what it hands on (check_options reads it); the run is kmeans-lsuv's.
    report = kmeans_lsuv_(model, images, layers=layers, stat_patches=stat_patches, seed=seed, generator=generator,
                          lsuv_options=lsuv_options, **options)
    report.method = "kmeans-fast"
    return report
