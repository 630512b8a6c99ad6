"""Everything that sets weights: baselines, data-dependent peers, k-means, and the ``initialize_`` entry point."""
from __future__ import annotations

import inspect
import typing

import torch
import torch.nn as nn
from torch import Tensor

from .baselines import fans, he_, lsuv_, normal_, whitening_, xavier_
from .kmeans import KMeansOptions, joint_objective, kmeans_init_, scale_filters_
from .options import check_type
from .report import InitReport, LayerReport
from .controls import he_kmeans_norm_, he_variance_norm_
from .fixup import fixup_, residual_blocks
from .hybrid import kmeans_fast_, kmeans_lsuv_

__all__ = [
    "initialize_", "METHODS", "PRESETS", "DATA_FREE", "kmeans_init_", "KMeansOptions", "joint_objective", "normal_", "xavier_", "he_",
    "lsuv_", "whitening_", "scale_filters_", "fans", "InitReport", "LayerReport", "he_kmeans_norm_",
    "he_variance_norm_", "kmeans_lsuv_", "kmeans_fast_", "fixup_", "residual_blocks", "RUNS_KMEANS", "check_options", "seeded_options",
]

#: k-means presets: keyword arguments of :func:`kmeans_init_`; explicit options override them.
PRESETS: dict[str, dict] = {
    # Chosen by the study at the paper's fixed lr 1e-3 (docs/results/study.md): layer-wise spherical
    # k-means on contrast-normalized, ZCA-whitened patches (Coates & Ng), each centroid used with its
    # negative, filters mapped back to raw patches and scaled to the Xavier-normal norm. At tuned
    # rates it does not beat He (docs/results/fair.md); `kmeans-variance` is the recommended one.
    "kmeans": dict(mode="layerwise", solver="lloyd", preprocess="zca", pairs=True, scale="xavier"),
    # Control: the `kmeans` preset's directions at He's filter norm (sqrt 2), to tell the direction
    # from the scale (with BN after a conv the norm only sets the effective learning rate).
    "kmeans-he-norm": dict(mode="layerwise", solver="lloyd", preprocess="zca", pairs=True, scale="he"),
    # The recommended preset: the same directions, each layer in forward order scaled to unit output
    # variance on the init images (as LSUV does). docs/results/fair.md, each init at its best rate:
    # PaperNet without BN 8.8 points and with BN 3.2 points above the best baseline after 3 epochs;
    # ResNet-20 level with LSUV.
    "kmeans-variance": dict(mode="layerwise", solver="lloyd", preprocess="zca", pairs=True, scale="variance"),
    # The paper's joint objective solved by our fast solver (Lloyd + joint Adam refinement).
    "kmeans-joint": dict(mode="joint", solver="lloyd"),
    # The paper as written: joint objective summed over patches, lambda = 100, momentum SGD for
    # 10,000 steps on batches of 64, unit-norm filters.
    "kmeans-paper": dict(mode="joint", solver="gradient", steps=10_000, batch_size=64, reduction="sum",
                         cosine_weight=100.0, scale="unit", momentum=0.9),
    # Kraehenbuehl et al. (2015): spherical k-means layer by layer, earlier layers fixed.
    "kmeans-layerwise": dict(mode="layerwise", solver="lloyd"),
}

_DATA_FREE = {"normal": normal_, "xavier": xavier_, "he": he_, "he-kmeans-norm": he_kmeans_norm_, "fixup": fixup_}
_DATA = {"lsuv": lsuv_, "whitening": whitening_, "he-variance-norm": he_variance_norm_, "kmeans-lsuv": kmeans_lsuv_,
         "kmeans-fast": kmeans_fast_}
DATA_FREE = tuple(_DATA_FREE)  # methods that need no images
METHODS = tuple(_DATA_FREE) + tuple(_DATA) + tuple(PRESETS)
#: Methods that run the k-means init (the presets, the control that runs one on a copy, the hybrid): they take
#: its ``seed`` and ``progress`` options.
RUNS_KMEANS = tuple(PRESETS) + ("he-variance-norm", "kmeans-lsuv", "kmeans-fast")


def check_options(method: str, options: dict) -> None:
    """Raise ``ValueError`` naming the first of ``options`` that ``method`` does not take, or whose value
    has the wrong type or range, without touching a model: so a training run can refuse a bad
    ``--init-option`` before it loads any data."""
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; valid: {', '.join(METHODS)}")
    opts = {k: v for k, v in options.items() if k != "progress"}  # every method takes it
    if method in PRESETS:
        base = opts.pop("base", "he")
        if base not in ("normal", "xavier", "he", None):
            raise ValueError(f"base must be normal, xavier, he or None, got {base!r}")
        KMeansOptions().with_overrides(**{**PRESETS[method], **opts}).validate()
        return
    fn = {**_DATA_FREE, **_DATA}[method]
    params, hints = inspect.signature(fn).parameters, typing.get_type_hints(fn)
    named = [n for n, p in params.items() if n not in ("model", "images")
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    rest = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in opts.items():
        if key in named:
            check_type(f"{method} option {key}", value, hints.get(key))
        elif not rest:
            raise ValueError(f"init {method!r} takes no option {key!r}; valid: {', '.join(named) or 'none'}")
    if rest:  # he-variance-norm, kmeans-lsuv and kmeans-fast hand their other options to a kmeans-variance run
        check_options("kmeans-variance", {k: v for k, v in opts.items() if k not in named})


def seeded_options(method: str, options: dict, seed: int) -> dict:
    """``options`` with ``seed`` filled in where ``method`` takes one: the k-means init's ``seed``
    (presets, controls, hybrid) and the ``generator`` of every other init (the presets seed their base
    init from ``seed``). Values already in ``options`` win. So one integer seeds any method."""
    out = dict(options)
    if method in RUNS_KMEANS:
        out.setdefault("seed", seed)
    if method not in PRESETS:
        out.setdefault("generator", torch.Generator().manual_seed(seed))
    return out


def initialize_(model: nn.Module, method: str, images: Tensor | None = None, **options) -> InitReport:
    """Initialize every conv (and linear) layer of ``model`` in place by ``method``; return an :class:`InitReport`.

    Methods: ``"normal"`` (std 1e-3), ``"xavier"``, ``"he"``, ``"he-kmeans-norm"``, ``"fixup"`` (residual
    nets: each block's last conv and the classifier at zero, the branch's other convs scaled down; no data);
    ``"lsuv"``, ``"whitening"``, ``"he-variance-norm"`` (He's directions at ``kmeans-variance``'s norms),
    ``"kmeans-lsuv"`` (``kmeans-variance`` in the first ``layers=2`` layers, LSUV in the others),
    ``"kmeans-fast"`` (the same with ``layers=1`` and ZCA statistics from at most 65,536 patches),
    ``"kmeans"`` (our first preset), ``"kmeans-he-norm"`` and ``"kmeans-variance"`` (its directions at
    He's norm, or at unit output variance per layer), ``"kmeans-joint"``, ``"kmeans-paper"`` (the
    paper's recipe), ``"kmeans-layerwise"`` (these need ``images``). ``options`` go to the underlying function and override a preset's values.
    Data-free methods set linear layers too. The k-means presets first apply ``base`` (default
    ``"he"``; ``None`` to keep the current weights) to every conv and linear layer, seeded by
    ``seed``, then set the conv layers by k-means (``include_linear=True`` for linear ones too), so
    the layers k-means leaves alone (linear ones, or those past ``layers=N``) start from a known init.
    """
    check_options(method, options)
    progress = options.pop("progress", None)  # every method takes it; only the k-means ones show a bar
    if method in _DATA_FREE:
        return _DATA_FREE[method](model, **options)
    if images is None:
        raise ValueError(f"init method {method!r} needs images (an unlabelled image tensor)")
    if progress is not None and method in RUNS_KMEANS:
        options["progress"] = progress
    if method in _DATA:
        return _DATA[method](model, images, **options)
    base = options.pop("base", "he")  # check_options above has refused any other value
    if base is not None:
        _DATA_FREE[base](model, generator=torch.Generator().manual_seed(options.get("seed", 0)))
    report = kmeans_init_(model, images, **{**PRESETS[method], **options})
    report.method = method
    return report
