"""Data-dependent k-means initialization: joint (Zhou, sec. 3.2) and layer-wise (Kraehenbuehl et al. 2015).

Everything is in convolution form (see :mod:`kmeansinit.objectives`): assignments come from one
convolution with unit filters, each cluster's sum of assigned patches from one conv weight-gradient.

Solvers
-------
``"gradient"`` (the paper): one loss, the sum over layers of the spherical k-means objective (eq. 3)
minus ``cosine_weight`` times the cosine penalty (eq. 4); SGD with momentum on every filter at once,
forward through BN (batch statistics) and ReLU, gradients through earlier layers.

``"lloyd"`` (ours, the default): block-coordinate ascent of the same joint objective. Layers in
forward order; for each, spherical-k-means Lloyd steps on its inputs with the earlier layers at their
new values (each Lloyd step maximizes that layer's term exactly for fixed assignments), then
``refine_steps`` Adam steps on the full joint loss (couplings between layers and the cosine term).
``mode="layerwise"`` is the same first phase with no joint refinement: Kraehenbuehl et al.'s method.

Where the parts live: options in :mod:`.options` (:class:`KMeansOptions`), layers and their inputs in
:mod:`.targets`, the Lloyd solvers (batch and streaming) in :mod:`.lloyd`, the joint objective and the
gradient solver in :mod:`.gradient`, patch spaces (raw, ZCA) in :mod:`.whiten`, final norms in
:mod:`.scale`. This module runs them in order.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import world
from ._model import Taps, batchnorm_train_mode, check_images, find_layers, forward_order, preserved_state
from .gradient import _evaluate, _gradient_phase, joint_objective
from .lloyd import lloyd, lloyd_online, lloyd_rows, orthogonalize_banks
from .lockstep import Lockstep, Untraceable
from .options import MODES, PREPROCESS, SOLVERS, KMeansOptions
from .report import InitReport, LayerReport
from .scale import SCALES, _calibrate_variance_, filter_norm, scale_filters_
from .targets import _EPS, _LayerInputs, _channel_mean, _require_patches, _Target, _target, unsupported_reason
from .whiten import RawSpace, ZCASpace

__all__ = ["kmeans_init_", "KMeansOptions", "joint_objective", "scale_filters_", "unsupported_reason",
           "orthogonalize_banks", "filter_norm", "MODES", "SOLVERS", "SCALES", "PREPROCESS"]


def kmeans_init_(model: nn.Module, images: Tensor, options: KMeansOptions | None = None, **overrides) -> InitReport:
    """Set the weights of every conv (and, with ``include_linear``, linear) layer of ``model`` by k-means, in place.

    The objective of one layer is eq. 3, ``max_k <x_i, w_k/||w_k||>`` reduced over its input patches
    ``x_i`` (``reduction="sum"`` as in the paper, ``"mean"`` as in the authors' code). The joint loss
    maximized by ``mode="joint"`` is ``sum_l objective_l - cosine_weight * sum_l cosine_penalty_l``
    (eqs. 3-5; the paper uses ``cosine_weight=100``), evaluated with BN layers in train mode (batch
    statistics), dropout off, and gradients flowing through earlier layers.

    Args:
        model: any ``nn.Module`` taking one tensor; its supported layers are found by type.
        images: unlabelled float images, ``(N, C, ...)``, already normalized as for training.
        options: a :class:`KMeansOptions` (every option, documented there); default ``KMeansOptions()``.
        **overrides: any field of :class:`KMeansOptions` by name (``mode="layerwise"``, ``steps=5``, ...),
            applied over ``options``; an unknown name raises ``ValueError`` naming it.

    Biases of the initialized layers are set to zero; every other parameter and buffer (BN running
    statistics included), every module's train/eval mode and ``requires_grad`` are left as they were.

    Returns:
        An :class:`InitReport` with each layer's objective before and after, cosine penalty, steps, seconds.
    """
    start = time.perf_counter()
    if options is not None and not isinstance(options, KMeansOptions):
        raise ValueError(f"options must be a KMeansOptions, got {type(options).__name__}")
    o = (options or KMeansOptions()).with_overrides(**overrides).resolved(world()[1])
    images = check_images(images, min_count=2)
    gen = torch.Generator().manual_seed(o.seed)

    found = find_layers(model, include_linear=o.include_linear, layers=o.layers)
    keep = {f"{n}.weight" for n in found} | {f"{n}.bias" for n in found if found[n].bias is not None}
    with preserved_state(model, keep), batchnorm_train_mode(model), torch.no_grad():
        targets, skipped = _targets(model, found, images, o)
        with Taps(model, {t.name: t.module for t in targets}, outputs=True) as taps:
            weights = {t.name: t.module.weight.detach().clone() for t in targets}
            # Report objectives on at most `stat_images` images: on a whole training set they would
            # cost more than the init.
            report_images = images[:o.stat_images]
            before, _, joint_before = _evaluate(taps, report_images, targets, weights, o.reduction, o.batch_size,
                                                o.cosine_weight)
            reports = [LayerReport(t.name, t.filters, objective_before=b) for t, b in zip(targets, before)]
            history: list = []
            total = (o.steps * len(targets) if o.solver == "lloyd" else o.steps) + o.refine_steps
            bar = _progress(total, o.progress, f"k-means init ({o.mode}, {o.solver})")
            try:
                if o.solver == "lloyd":
                    weights = _lloyd_phase(taps, images, targets, reports, weights, o, gen, bar)
                    if o.refine_steps:
                        weights = _refine(taps, images, targets, reports, weights, o, gen, bar, history)
                else:
                    weights = _paper_phase(taps, images, targets, reports, weights, o, gen, bar, history)
            finally:
                bar.close()
            final = _final_filters(targets, weights, o.scale)
            if o.scale == "variance":
                _calibrate_variance_(taps, report_images, targets, final, o.batch_size,
                                     _lockstep(taps, report_images, o))
            after, pens, joint_after = _evaluate(taps, report_images, targets, final, o.reduction, o.batch_size,
                                                 o.cosine_weight)
            for t, rep, a, p in zip(targets, reports, after, pens):
                rep.objective_after, rep.cosine_after = a, p
    # Written after preserved_state restored everything else, so only these tensors change.
    with torch.no_grad():
        for t in targets:
            t.module.weight.copy_(final[t.name])
            if t.module.bias is not None:
                t.module.bias.zero_()
    return InitReport(method=f"kmeans-{o.mode}", layers=reports, options=o.report_dict(int(images.shape[0])),
                      seconds=time.perf_counter() - start, joint_before=joint_before, joint_after=joint_after,
                      history=history, skipped=skipped)


def _targets(model: nn.Module, found: dict, images: Tensor, o: KMeansOptions) -> tuple[list[_Target], dict]:
    """The layers to cluster in forward order, and those skipped with the reason."""
    order = forward_order(model, found, images[: min(o.batch_size, images.shape[0])])
    if isinstance(o.layers, int):
        order = order[:o.layers]
    targets, skipped = [], {}
    for n in order:
        t = _target(n, found[n])
        reason = unsupported_reason(t.module, o.preprocess, o.pairs)
        if reason is None:
            targets.append(t)
        elif o.unsupported == "error":
            raise ValueError(f"layer {n}: {reason}")
        else:
            skipped[n] = reason
    if not targets:
        raise ValueError(f"no layer of {type(model).__name__} can be clustered with these options: "
                         + "; ".join(f"{n}: {r}" for n, r in skipped.items()))
    return targets, skipped


def _lockstep(taps, images: Tensor, o: KMeansOptions) -> Lockstep | None:
    """A one-pass stepper over the layer inputs where it gives the recomputing path's inputs; else None."""
    if not o.lockstep or world()[1] != 1 or images.shape[0] > o.stat_images:
        return None
    try:
        return Lockstep(taps, images, o.batch_size)
    except Untraceable:  # e.g. data-dependent control flow: recompute each layer's inputs
        return None


def _stepped_inputs(stepper: Lockstep | None, taps, images, t, o: KMeansOptions) -> tuple[_LayerInputs, Lockstep | None]:
    """Layer ``t``'s inputs, from the stepper while it applies (and the stepper, or None once it stops)."""
    if stepper is not None:
        xs = stepper.inputs(t.name)
        given = _LayerInputs.given(taps, images, t.name, o.batch_size, o.cache_bytes, xs)
        if given is not None:
            return given, stepper
        # Beyond cache_bytes: this and later layers stream their recomputed inputs.
    return _LayerInputs(taps, images, t.name, o.batch_size, o.cache_bytes), None


def _lloyd_phase(taps, images, targets, reports, weights, o: KMeansOptions, gen, bar) -> dict:
    """Layer by layer in forward order: Lloyd on the layer's inputs (earlier layers at their new values)."""
    stepper = _lockstep(taps, images, o)
    for t, rep in zip(targets, reports):
        t0 = time.perf_counter()
        inputs, stepper = _stepped_inputs(stepper, taps, images, t, o)
        _require_patches(inputs, t)
        # More images than `stat_images`, or too many to keep this layer's inputs: statistics and
        # seeds from the first `stat_images`, then `stream_passes` online passes over all of them,
        # inputs recomputed and never kept, so that memory does not grow with the number of images.
        online = world()[1] == 1 and (inputs.streaming or images.shape[0] > o.stat_images)
        stats = inputs.head(o.stat_images) if online else inputs
        if online:
            inputs.cache_bytes = 0
        if o.preprocess == "zca":
            space = ZCASpace(t.module, stats, eps_zca=o.zca_eps, max_patches=o.stat_patches, seed=o.seed,
                             eigh_dtype=getattr(torch, o.zca_eigh), whitening=o.whitening, keep_rows=o.lloyd_patches)
        else:
            space = RawSpace(t.module, _channel_mean(stats, t.module) if o.preprocess == "center" else None)
        if o.lloyd_patches is not None:  # sampled rows, kept by the statistics' pass: no pass over the inputs
            w, done = lloyd_rows(t, space, o.steps, gen, pairs=o.pairs, orthogonal=o.orthogonal)
        elif online:
            w, done = lloyd_online(t, inputs, space, o.stream_passes, gen, pairs=o.pairs, orthogonal=o.orthogonal,
                                   seeds=stats)
        else:
            w, done = lloyd(t, inputs, space, o.steps, gen, pairs=o.pairs, orthogonal=o.orthogonal)
        bar.update(o.steps)
        # Later layers cluster the inputs they will really see: this layer's filters at their final
        # scale (it matters where no BN follows, e.g. before a gate).
        weights[t.name] = scale_filters_(w.to(t.module.weight.dtype), o.scale, t.module)
        t.module.weight.copy_(weights[t.name])
        if t.module.bias is not None:
            t.module.bias.zero_()
        rep.steps, rep.seconds = done, time.perf_counter() - t0
    return weights


def _refine(taps, images, targets, reports, weights, o: KMeansOptions, gen, bar, history) -> dict:
    """Joint Adam steps after the Lloyd phase: couplings between layers and the cosine term."""
    t0 = time.perf_counter()
    weights = _gradient_phase(taps, images, targets, weights, steps=o.refine_steps, lr=o.lr, optimizer="adam",
                              momentum=o.momentum, batch_size=o.batch_size, decay=True, cosine_weight=o.cosine_weight,
                              reduction=o.reduction, renormalize=o.renormalize, gen=gen, bar=bar,
                              accumulate=o.accumulate, history=history)
    for rep in reports:
        rep.steps += o.refine_steps
        rep.seconds += (time.perf_counter() - t0) / len(reports)
    return weights


def _paper_phase(taps, images, targets, reports, weights, o: KMeansOptions, gen, bar, history) -> dict:
    """The paper's solver: ``steps`` momentum-SGD steps on the joint loss, every filter at once."""
    t0 = time.perf_counter()
    for t in targets:
        # The gradient solver samples the whole image set, so count over all images.
        _require_patches(_LayerInputs(taps, images, t.name, o.batch_size, o.cache_bytes), t)
    weights = {t.name: scale_filters_(weights[t.name].clone(), o.scale, t.module) for t in targets}
    weights = _gradient_phase(taps, images, targets, weights, steps=o.steps, lr=o.lr, optimizer="sgd",
                              momentum=o.momentum, batch_size=o.batch_size, cosine_weight=o.cosine_weight,
                              reduction=o.reduction, renormalize=o.renormalize, gen=gen, bar=bar,
                              accumulate=o.accumulate, history=history)
    for rep in reports:
        rep.steps, rep.seconds = o.steps, (time.perf_counter() - t0) / len(reports)
    return weights


def _final_filters(targets, weights: dict, scale: str) -> dict:
    final = {}
    for t in targets:
        w = weights[t.name]
        if not torch.isfinite(w).all() or bool((w.flatten(1).norm(dim=1) <= _EPS).any()):
            raise FloatingPointError(f"layer {t.name}: k-means produced a zero or non-finite filter")
        final[t.name] = scale_filters_(w.clone(), scale, t.module)
    return final


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety, never a reason to fail
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)
