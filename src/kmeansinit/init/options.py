"""Every option of the k-means init, in one dataclass: what each means, its default, and its checks."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .scale import SCALES

MODES = ("joint", "layerwise")
SOLVERS = ("lloyd", "gradient")
PREPROCESS = ("none", "center", "zca")


def check_type(label: str, value, hint) -> None:
    """``ValueError`` naming ``label`` where ``value`` does not fit the plain type ``hint`` (``int``,
    ``float``, ``bool``, ``str``, or one of them ``| None``; any other type is not checked). Options
    often arrive as text (``--init-option zca_eps=abc``): say which one is wrong, not what a comparison
    deep inside the init raised. A float takes an int; no number takes a bool."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return
    if bool in kinds:
        ok, what = isinstance(value, bool), "true or false"
    elif float in kinds:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif int in kinds:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif str in kinds:
        ok, what = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ValueError(f"{label} must be {what}{' or None' if type(None) in kinds else ''}, got {value!r}")


@dataclass
class KMeansOptions:
    """Options of :func:`kmeansinit.init.kmeans_init_` (every keyword it takes is a field here).

    Attributes:
        mode: ``"joint"`` (the paper, sec. 3.2) or ``"layerwise"`` (Kraehenbuehl et al. 2015: k-means
            layer by layer in forward order, earlier layers fixed, no cosine term).
        solver: ``"lloyd"`` (default: per-layer Lloyd steps, then ``refine_steps`` Adam steps on the
            joint loss) or ``"gradient"`` (the paper: ``steps`` momentum-SGD steps on the joint loss).
        steps: Lloyd iterations per layer (default 10; 5 in joint mode, where the refinement follows)
            or gradient steps (default 10,000, the paper).
        refine_steps: joint Adam steps after the Lloyd phase (default 50; 0 in layerwise mode). With
            the default lr this beats the paper's 10,000-step recipe on the joint objective for
            PaperNet and its gated form (benchmarks/solver_sweep.py).
        batch_size: images per gradient step (paper: 64); also the chunk size of every forward pass,
            hence of the BN batch statistics.
        accumulate: batches of ``batch_size`` per gradient step, their gradients summed (default 1;
            under torch.distributed, the world size: each rank takes its share of the batches, so a
            W-rank init equals a one-process init with ``accumulate=W``).
        lr: step size (defaults: Adam 1e-2 for the refinement; SGD 1e-5 for ``reduction="sum"``,
            1e-2 for ``"mean"``, with filters starting at unit norm).
        momentum: of the gradient solver's SGD (paper: 0.9).
        cosine_weight: lambda of eq. 5 (paper: 100).
        reduction: eq. 3 summed over patches (``"sum"``, the paper) or averaged (``"mean"``, the authors' code).
        scale: final filter norm: ``"he"`` (default; sqrt(2), the expected He-normal norm, so training
            starts at the usual effective learning rate), ``"xavier"`` (the expected Xavier-normal
            norm, ``sqrt(2 fan_in / (fan_in + fan_out))``), ``"unit"`` (the paper), or ``"variance"``
            (data-dependent: each layer, in forward order, scaled so that its output has unit
            variance on the images, as LSUV does). With BN after a layer the norm changes nothing in
            the forward pass but sets the effective learning rate, ``lr / ||w||^2``.
        preprocess: ``"none"`` (the paper), ``"center"`` (subtract each layer's per-channel input mean
            before clustering) or ``"zca"`` (per-patch mean/contrast normalization and ZCA whitening, as
            Coates & Ng 2012; centroids mapped back to raw-patch filters, see
            :mod:`kmeansinit.init.whiten`). Applies to the Lloyd phase.
        pairs: each filter's partner (half a bank away) is its negative, so that a ReLU passes both
            signs of every cluster direction (as in the whitening init of airbench); Lloyd phase.
        orthogonal: replace each layer's centroids by the closest orthonormal set (per bank), the
            limit of the cosine penalty at infinite weight; Lloyd phase.
        layers: None (all), an int N (the first N layers in forward order), or a list of module names.
        include_linear: cluster ``nn.Linear`` layers too.
        renormalize: project filters back to unit norm after every gradient step (the authors' code).
        cache_bytes: layer inputs up to this size are kept in memory between Lloyd steps; larger ones
            are recomputed chunk by chunk.
        stream_passes: with more than ``stat_images`` images, or inputs larger than ``cache_bytes``,
            one process runs this many online Lloyd passes over all images per layer in place of
            ``steps`` batch iterations, recomputing the layer's inputs chunk by chunk and keeping none,
            so memory does not grow with the number of images (the whole training set:
            ``kmeansinit train --init-images 0``).
        stat_images: seeds, ZCA and centring statistics and the report's objectives come from at most
            this many images (the first ones).
        stat_patches: ``preprocess="zca"`` estimates each layer's patch covariance from at most about
            this many patches (a random, seeded share of every chunk; ``None``: all).
        lloyd_patches: with ``preprocess="zca"``, run each layer's Lloyd iterations on about this many
            sampled patches (an equal, seeded random share of every chunk of the statistics images) in
            matrix form (:func:`~kmeansinit.init.lloyd.lloyd_rows`), instead of on every patch position
            of every image in convolution form (``None``, the default). Much cheaper per iteration;
            one process only.
        zca_eps: ``preprocess="zca"``'s regularizer, relative to the mean eigenvalue of the patch
            covariance: ``W = V (L + zca_eps * mean(L))^(-1/2) V^T``. Smaller values whiten the
            weakest (highest-frequency) directions more.
        zca_eigh: precision of the ZCA covariance's eigendecomposition, ``"float64"`` (default) or
            ``"float32"`` (about twice as fast; the covariance itself is accumulated in float64).
        whitening: how ``preprocess="zca"`` factors the regularized covariance ``C + eps I``: ``"zca"``
            (default), ``W = V (L + eps)^(-1/2) V^T`` from an eigendecomposition; ``"cholesky"``,
            ``W = L^(-1)`` from its Cholesky factor, a rotation of ZCA's whitened space in which
            spherical k-means runs the same algorithm without the eigendecomposition
            (:class:`~kmeansinit.init.whiten.ZCASpace`): in float64 on a small net the same weights
            (tested), but in float32 on real images the rounding differences flip near-tie
            assignments and deeper layers end in other local optima (PaperNet, kmeans-variance,
            256 CIFAR-10 images: mean filter cosine to the ZCA run 1.00 and 0.97 in the first two
            layers, 0.18-0.81 in the other six: ``benchmarks/whitening_agreement.py``), so it is another init
            of the same kind, not the same one.
        lockstep: compute the Lloyd phase's and the variance calibration's layer inputs in one pass
            through the net (a ``torch.fx`` trace run over all chunks together, paused before each
            layer: :mod:`kmeansinit.init.lockstep`) instead of a forward pass up to each layer from
            the images; the same inputs at ``O(L)`` instead of ``O(L^2)`` layer calls. Used where it
            applies (one process, at most ``stat_images`` images, inputs within ``cache_bytes``, a model
            fx can trace); elsewhere, or with ``False``, the inputs are recomputed.
        seed: seeds every random choice; same seed and images give the same weights.
        progress: show a progress bar.
        unsupported: what to do with a layer these options cannot cluster (``preprocess="zca"`` on a
            grouped conv, depthwise ones included; ``pairs`` with an odd number of filters per
            group): ``"skip"`` (default) leaves its weights as they are (a preset's ``base`` init)
            and names it in the report's ``skipped``; ``"error"`` raises ``ValueError``.
    """

    mode: str = "joint"
    solver: str = "lloyd"
    steps: int | None = None
    refine_steps: int | None = None
    batch_size: int = 64
    accumulate: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    cosine_weight: float = 100.0
    reduction: str = "sum"
    scale: str = "he"
    preprocess: str = "none"
    pairs: bool = False
    orthogonal: bool = False
    layers: object = None
    include_linear: bool = False
    renormalize: bool = False
    cache_bytes: int = 512 * 2**20
    stream_passes: int = 1
    stat_images: int = 4096
    stat_patches: int | None = 2**18
    lloyd_patches: int | None = None
    zca_eps: float = 1e-2
    zca_eigh: str = "float64"
    whitening: str = "zca"
    lockstep: bool = True
    seed: int = 0
    progress: bool = True
    unsupported: str = "skip"

    def with_overrides(self, **kwargs) -> "KMeansOptions":
        """A copy with these fields replaced, with a one-line error naming an unknown one."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise ValueError(f"unknown k-means option {unknown[0]!r}; valid: {', '.join(names)}")
        return dataclasses.replace(self, **kwargs)

    def validate(self) -> None:
        """``ValueError`` naming the first option of the wrong type, out of range, or inconsistent."""
        self._check_types()
        for name, allowed in (("mode", MODES), ("solver", SOLVERS), ("scale", SCALES), ("preprocess", PREPROCESS),
                              ("reduction", ("mean", "sum")), ("unsupported", ("skip", "error")),
                              ("zca_eigh", ("float64", "float32")), ("whitening", ("zca", "cholesky"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (self.preprocess != "none" or self.pairs or self.orthogonal) and self.solver != "lloyd":
            raise ValueError("preprocess and pairs shape the Lloyd phase; they need solver='lloyd'")
        if self.mode == "layerwise" and self.solver != "lloyd":
            raise ValueError("mode='layerwise' runs spherical k-means (solver='lloyd'); solver='gradient' is joint only")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.cosine_weight < 0:
            raise ValueError(f"cosine_weight must be >= 0, got {self.cosine_weight}")
        if not self.zca_eps > 0:
            raise ValueError(f"zca_eps must be > 0, got {self.zca_eps}")
        if self.lloyd_patches is not None:
            if self.preprocess != "zca":
                raise ValueError(f"lloyd_patches samples ZCA-whitened patches; it needs preprocess='zca', got {self.preprocess!r}")
            if not isinstance(self.lloyd_patches, int) or self.lloyd_patches < 1:
                raise ValueError(f"lloyd_patches must be a positive int or None, got {self.lloyd_patches!r}")
        if isinstance(self.layers, int) and not isinstance(self.layers, bool) and self.layers < 1:
            raise ValueError(f"layers must be >= 1 when an int, got {self.layers}")

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f"k-means option {f.name}", getattr(self, f.name), hints[f.name])

    def resolved(self, world_size: int = 1) -> "KMeansOptions":
        """A validated copy with every ``None`` default filled in (steps, refine_steps, lr, accumulate)."""
        self.validate()
        o = dataclasses.replace(self)
        joint_lloyd = o.mode == "joint" and o.solver == "lloyd"
        if o.steps is None:
            # In joint mode the refinement follows, and Lloyd iterations past 5 add nothing there
            # (objectives swept with benchmarks/solver_sweep.py --lloyd 3,5,10).
            o.steps = (5 if joint_lloyd else 10) if o.solver == "lloyd" else 10_000
        if o.refine_steps is None:
            o.refine_steps = 50 if joint_lloyd else 0
        if o.mode == "layerwise":
            o.refine_steps, o.cosine_weight = 0, 0.0
        if o.steps < 0 or o.refine_steps < 0:
            raise ValueError("steps and refine_steps must be >= 0")
        if o.lr is None:
            # Adam refinement: benchmarks/solver_sweep.py and RESULTS.md; SGD on unit filters by reduction.
            o.lr = 1e-2 if o.solver == "lloyd" else (1e-5 if o.reduction == "sum" else 1e-2)
        if o.lloyd_patches is not None and world_size > 1:
            raise ValueError("lloyd_patches runs in one process; under torch.distributed leave it None")
        o.accumulate = world_size if o.accumulate is None else o.accumulate
        if o.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {o.accumulate}")
        return o

    def report_dict(self, images: int) -> dict:
        """What the init report records of these (resolved) options."""
        d = {k: getattr(self, k) for k in ("mode", "solver", "steps", "refine_steps", "batch_size", "accumulate", "lr",
                                           "momentum", "cosine_weight", "reduction", "scale", "preprocess", "pairs",
                                           "orthogonal", "renormalize", "seed")}
        d["images"] = images
        if self.preprocess == "zca":
            d["zca_eps"] = self.zca_eps
            if self.zca_eigh != "float64":  # only when not the default: earlier reports stay as they were
                d["zca_eigh"] = self.zca_eigh
            if self.whitening != "zca":
                d["whitening"] = self.whitening
            if self.lloyd_patches is not None:
                d["lloyd_patches"] = self.lloyd_patches
            if self.stat_patches != KMeansOptions.stat_patches:  # as zca_eigh: only when not the default
                d["stat_patches"] = self.stat_patches
        return d

