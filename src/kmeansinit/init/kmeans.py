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
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import GatedConv2d
from ..objectives import cosine_penalty, filter_responses, patch_sq_norms, unit_filters
from ..distributed import all_gather_object, all_reduce_, world
from ._model import Taps, batchnorm_train_mode, check_images, find_layers, forward_order, preserved_state
from .report import InitReport, LayerReport
from .whiten import RawSpace, ZCASpace

__all__ = ["kmeans_init_", "joint_objective", "scale_filters_", "unsupported_reason"]

_EPS = 1e-8
MODES = ("joint", "layerwise")
SOLVERS = ("lloyd", "gradient")
SCALES = ("unit", "he", "xavier", "variance")
PREPROCESS = ("none", "center", "zca")


@dataclass
class _Target:
    name: str
    module: nn.Module
    perm: Tensor  # perm[i] = layer-layout filter index of conv-layout (bank-major) position i
    banks: int

    @property
    def filters(self) -> int:
        return self.module.weight.shape[0]

    @property
    def per_bank(self) -> int:
        return self.filters // self.banks


def _target(name: str, m: nn.Module) -> _Target:
    k = m.weight.shape[0]
    idx = torch.arange(k, device=m.weight.device)
    if isinstance(m, GatedConv2d):
        idx = m.conv_weight(idx.reshape(k, 1, 1, 1)).reshape(-1)
    banks = 1 if isinstance(m, nn.Linear) else m.groups
    return _Target(name, m, idx, banks)


def _to_layer_order(t: _Target, v: Tensor) -> Tensor:
    out = torch.empty_like(v)
    out[t.perm] = v
    return out


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


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
                         batch_size: int) -> None:
    """Scale each target's filters, in forward order, so its output has unit variance on ``images``."""
    for t in targets:
        stats = torch.zeros(3, dtype=torch.float64)
        overrides = {f"{u.name}.weight": weights[u.name] for u in targets}
        chunks = list(images.split(batch_size))
        rank, size = world()
        for ci in range(rank, len(chunks), size):
            x = taps.run(chunks[ci], overrides, stop_at=t.name)[t.name]
            y = filter_responses(x, t.module, weights[t.name], normalize=False).double()
            stats += torch.tensor([float(y.sum()), float(y.square().sum()), y.numel()], dtype=torch.float64)
        total, sq, count = all_reduce_(stats).tolist()
        var = sq / count - (total / count) ** 2
        if not var > 0:
            raise ValueError(f"layer {t.name}: output variance {var} on the init images; cannot calibrate scale")
        weights[t.name] = weights[t.name] / math.sqrt(var)


class _LayerInputs:
    """One layer's inputs over all init images, in fixed chunks: cached when small, else recomputed.

    Under torch.distributed, rank ``r`` owns chunks ``r, r + W, r + 2W, ...``: each chunk (and so
    each BN batch) is the one a single process would see, and sums over chunks are all-reduced.
    """

    def __init__(self, taps: Taps, images: Tensor, name: str, batch_size: int, cache_bytes: int):
        self.taps, self.images, self.name = taps, images, name
        self.chunks = list(images.split(batch_size))
        rank, size = world()
        self.owned = [i for i in range(len(self.chunks)) if i % size == rank]
        self.cache_bytes = cache_bytes
        self.cache: list[tuple[int, Tensor]] | None = None

    def _compute(self, chunk: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.taps.run(chunk, stop_at=self.name)[self.name].detach()
        if x.dim() == 4:
            # Channels innermost: the conv kernels skip a layout reorder and the argmax over
            # filters reads contiguous memory (7x faster on CPU for PaperNet's layers).
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def indexed(self):
        """(global chunk index, layer input) for this rank's chunks."""
        if self.cache is not None:
            yield from self.cache
            return
        kept, size = [], 0
        for ci in self.owned:
            x = self._compute(self.chunks[ci])
            size += x.numel() * x.element_size()
            if kept is not None:
                if size <= self.cache_bytes:
                    kept.append((ci, x))
                else:
                    kept = None
            yield ci, x
        if kept is not None:
            self.cache = kept

    def __iter__(self):
        for _, x in self.indexed():
            yield x

    def _first(self) -> Tensor:
        if self.cache:
            return self.cache[0][1]
        return self._compute(self.chunks[0][:2])

    def count_patches(self, m: nn.Module) -> int:
        """Patches per bank over all images, from the first chunk's geometry (no pass over the data)."""
        x = self._first()
        per_image = x[0].reshape(-1, x.shape[-1]).shape[0] if isinstance(m, nn.Linear) else patch_sq_norms(x[:1], m).shape[-1]
        return per_image * self.images.shape[0]

    @property
    def streaming(self) -> bool:
        """True when the inputs of all chunks would not fit ``cache_bytes``: every pass recomputes them."""
        x = self._first()
        return x[0].numel() * x.element_size() * self.images.shape[0] > self.cache_bytes

    @property
    def n_chunks(self) -> int:
        """Chunks over all ranks (of the head, for a head)."""
        return max(self.owned) + 1 if self.owned else 0

    def head(self, images: int) -> "_LayerInputs":
        """The same layer's inputs over the first chunks holding about ``images`` images."""
        sub = _LayerInputs.__new__(_LayerInputs)
        sub.__dict__.update(self.__dict__)
        per = self.chunks[0].shape[0]
        sub.owned = [i for i in self.owned if i < max(1, -(-images // per))]
        sub.cache = None
        return sub


def _channel_mean(inputs: _LayerInputs, m: nn.Module) -> Tensor:
    channels = m.weight.shape[1] * (1 if isinstance(m, nn.Linear) else m.groups)
    total = torch.zeros(channels + 1, dtype=torch.float64, device=m.weight.device)
    for x in inputs:
        dims = list(range(x.dim() - 1)) if isinstance(m, nn.Linear) else [0] + list(range(2, x.dim()))
        total[:-1] += x.double().sum(dim=dims)
        total[-1] += x.numel() // channels
    all_reduce_(total)
    return (total[:-1] / total[-1]).to(m.weight.dtype)


def _partners(t: _Target) -> Tensor:
    """For ``pairs``: each filter's partner (layer layout), the filter half a bank away."""
    kb = t.per_bank
    if kb % 2:
        raise ValueError(f"layer {t.name}: pairs=True needs an even number of filters per bank, got {kb}")
    conv = torch.arange(t.filters, device=t.perm.device).reshape(t.banks, kb)
    partner_conv = torch.cat([conv[:, kb // 2:], conv[:, :kb // 2]], dim=1).reshape(-1)
    out = torch.empty(t.filters, dtype=torch.long, device=t.perm.device)
    out[t.perm] = t.perm[partner_conv]
    return out


def _pick_patches(t: _Target, inputs, space, want: Tensor, score_fn) -> Tensor:
    """Centroids (layer layout) holding, for each ``want``-ed filter, the patch of its bank with the lowest score.

    ``want`` is a bool mask over filters (layer layout). Zero patches are never picked.
    """
    m, g, kb = t.module, t.banks, t.per_bank
    want_conv = want[t.perm].reshape(g, kb)
    need = want_conv.sum(dim=1)
    best = [[] for _ in range(g)]  # per bank: (score, chunk, flat position)
    for ci, x in inputs.indexed():
        sq = space.sq_norms(x)[:, :, 0, :]  # (N, G, L)
        score = score_fn(ci, x, sq).masked_fill(sq <= _EPS, math.inf)
        for b in range(g):
            k = int(need[b])
            if k == 0:
                continue
            flat = score[:, b, :].reshape(-1)
            vals, pos = torch.topk(flat, min(k, flat.numel()), largest=False)
            best[b].extend((float(v), ci, int(p)) for v, p in zip(vals, pos) if math.isfinite(float(v)))
    gathered = all_gather_object(best)
    best = [sum((r[b] for r in gathered), []) for b in range(g)]
    fills = {}  # chunk -> list of (bank, filter-in-bank, flat position)
    for b in range(g):
        k = int(need[b])
        chosen = sorted(best[b])[:k]
        if len(chosen) < k:
            raise ValueError(f"layer {t.name}: fewer non-zero input patches than filters; give more (or more varied) images")
        slots = torch.nonzero(want_conv[b]).reshape(-1).tolist()
        for slot, (_, ci, p) in zip(slots, chosen):
            fills.setdefault(ci, []).append((b, slot, p))
    like = m.weight.detach().contiguous()
    out = torch.zeros_like(like)
    for ci, x in inputs.indexed():
        if ci not in fills:
            continue
        r_shape = space.responses(x[:1], like).shape
        rows = x.reshape(-1, x.shape[-1]).shape[0] if isinstance(m, nn.Linear) else x.shape[0]
        n_pos = r_shape[-1]
        mask = x.new_zeros(rows, g, kb, n_pos)
        for b, slot, p in fills[ci]:
            mask[p // n_pos, b, slot, p % n_pos] = 1.0
        out += space.sums(x, mask, like)
    return all_reduce_(out)


def orthogonalize_banks(t: _Target, w: Tensor, partner: Tensor | None = None) -> Tensor:
    """The orthonormal filters closest to ``w`` in each bank (Loewdin: ``U V^T`` of ``w = U S V^T``).

    The limit of the cosine penalty (eq. 4) at infinite weight: every pair of filters of a bank
    becomes orthogonal while each filter stays as close as possible to its own centroid. With
    ``partner`` (pairs), the first filter of each pair is orthogonalized and its partner negated.
    """
    flat = w.flatten(1)
    conv = flat[t.perm].reshape(t.banks, t.per_bank, -1)
    keep = t.per_bank // 2 if partner is not None else t.per_bank
    if keep > conv.shape[-1]:
        raise ValueError(f"layer {t.name}: cannot orthogonalize {keep} filters of {conv.shape[-1]} dimensions")
    u, _, vh = torch.linalg.svd(conv[:, :keep].double(), full_matrices=False)
    ortho = (u @ vh).to(w.dtype)
    if partner is not None:
        ortho = torch.cat([ortho, -ortho], dim=1)
    out = torch.empty_like(flat)
    out[t.perm] = ortho.reshape(-1, flat.shape[1])
    return out.reshape(w.shape)


def _random_scores(gen: torch.Generator):
    """A factory of random patch scores: each product draws one base seed from ``gen``."""

    def make():
        base = int(torch.randint(2**62, (1,), generator=gen))

        def score(ci, x, sq):
            # One CPU generator per chunk: the same patches on every device however chunks are shared.
            g = torch.Generator().manual_seed(base + ci)
            return torch.rand(sq.shape, generator=g).to(sq.device)

        return score

    return make


def _lloyd(t: _Target, inputs, space, iters: int, gen: torch.Generator, pairs: bool = False,
           orthogonal: bool = False, online: bool = False, seeds=None, start: Tensor | None = None) -> tuple[Tensor, int]:
    """Spherical k-means on one layer's input patches (in ``space``); returns centroids and iterations run.

    With ``pairs`` each filter's partner is its negative: clustering by ``|<x, c>|``, so that a ReLU
    after the layer passes both signs of every direction. With ``online`` (for inputs streamed from
    many images) the centroids move after every chunk, to the running sums of their patches over the
    pass (mini-batch k-means with per-cluster step 1/count), so one pass does the work of many
    batch iterations; ``seeds`` (a smaller set of inputs) then supplies the first and re-seeded centroids.
    ``start``: first centroids (layer layout, in ``space``) instead of random patches (tests).
    """
    seeds = inputs if seeds is None else seeds
    partner = _partners(t) if pairs else None
    dev = t.perm.device
    everything = torch.ones(t.filters, dtype=torch.bool, device=dev)
    rand = _random_scores(gen)

    c = unit_filters(_pick_patches(t, seeds, space, everything, rand()) if start is None else start)
    bank_offset = (torch.arange(t.banks, device=dev) * t.per_bank).reshape(1, -1, 1, 1)
    if pairs:
        c = unit_filters(c - c[partner])
    done = 0
    for _ in range(iters):
        sums = torch.zeros_like(c)
        counts = torch.zeros(t.filters, dtype=torch.float64, device=dev)
        start = c
        for x in inputs:
            r = space.responses(x, c)
            idx = r.argmax(dim=2, keepdim=True)
            # Counts per filter (conv layout) from the indices: one pass over them, not over a mask.
            n = torch.bincount((idx + bank_offset).reshape(-1), minlength=t.filters).to(counts.dtype)
            counts += n
            pw = space.patch_weights(x)
            mask = torch.zeros_like(r).scatter_(2, idx, 1.0 if pw is None else pw.to(r.dtype).expand(idx.shape))
            sums += space.weighted_sums(x, mask, n, c)
            if online:
                run = sums - sums[partner] if pairs else sums
                c = torch.where(_expand(run.flatten(1).norm(dim=1) > _EPS, c), unit_filters(run), c)
        c = start
        all_reduce_(sums)
        all_reduce_(counts)
        counts = _to_layer_order(t, counts)
        if pairs:
            sums, counts = sums - sums[partner], counts + counts[partner]
        new = unit_filters(sums)
        dead = (counts == 0) | (sums.flatten(1).norm(dim=1) <= _EPS)
        if bool(dead.any()):
            want = dead & (torch.arange(t.filters, device=dev) < partner) if pairs else dead
            if pairs or isinstance(space, ZCASpace):
                score = rand()  # far-from-centroid scores need raw patch norms; random patches do here
            else:
                live_conv = (~dead)[t.perm].reshape(1, t.banks, t.per_bank, 1)

                def score(ci, x, sq, new=new, live_conv=live_conv):
                    r = space.responses(x, new).masked_fill(~live_conv, -math.inf)
                    return r.amax(dim=2) / sq.clamp_min(_EPS).sqrt()

            seeded = unit_filters(_pick_patches(t, seeds, space, want, score))
            if pairs:
                seeded[partner[want]] = -seeded[want]
                want = want | want[partner]
            new = torch.where(_expand(want, new), seeded, new)
        done += 1
        shift = (new - c).flatten(1).norm(dim=1).max()
        c = new
        if float(shift) < 1e-6:
            break
    w = unit_filters(space.to_raw(c))
    if orthogonal:
        w = orthogonalize_banks(t, w, partner)
    return w, done


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


def _default_lr(solver: str, reduction: str) -> float:
    if solver == "lloyd":
        return 1e-2  # Adam refinement; see benchmarks/solver_sweep.py and RESULTS.md
    return 1e-5 if reduction == "sum" else 1e-2


def kmeans_init_(
    model: nn.Module,
    images: Tensor,
    *,
    mode: str = "joint",
    solver: str = "lloyd",
    steps: int | None = None,
    refine_steps: int | None = None,
    batch_size: int = 64,
    accumulate: int | None = None,
    lr: float | None = None,
    momentum: float = 0.9,
    cosine_weight: float = 100.0,
    reduction: str = "sum",
    scale: str = "he",
    preprocess: str = "none",
    pairs: bool = False,
    orthogonal: bool = False,
    layers=None,
    include_linear: bool = False,
    renormalize: bool = False,
    cache_bytes: int = 512 * 2**20,
    stream_passes: int = 1,
    stat_images: int = 4096,
    stat_patches: int | None = 2**18,
    zca_eps: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    unsupported: str = "skip",
) -> InitReport:
    """Set the weights of every conv (and, with ``include_linear``, linear) layer of ``model`` by k-means, in place.

    The objective of one layer is eq. 3, ``max_k <x_i, w_k/||w_k||>`` reduced over its input patches
    ``x_i`` (``reduction="sum"`` as in the paper, ``"mean"`` as in the authors' code). The joint loss
    maximized by ``mode="joint"`` is ``sum_l objective_l - cosine_weight * sum_l cosine_penalty_l``
    (eqs. 3-5; the paper uses ``cosine_weight=100``), evaluated with BN layers in train mode (batch
    statistics), dropout off, and gradients flowing through earlier layers.

    Args:
        model: any ``nn.Module`` taking one image tensor; its supported layers are found by type.
        images: unlabelled float images, ``(N, C, ...)``, already normalized as for training.
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
        cosine_weight: lambda of eq. 5 (paper: 100).
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
        renormalize: project filters back to unit norm after every gradient step (the authors' code).
        cache_bytes: layer inputs up to this size are kept in memory between Lloyd steps; larger ones
            are recomputed chunk by chunk.
        stream_passes: with more than ``stat_images`` images, or inputs larger than ``cache_bytes``,
            one process runs this many online Lloyd passes over all images per layer in place of
            ``steps`` batch iterations, recomputing the layer's inputs chunk by chunk and keeping none,
            so memory does not grow with the number of images (the whole training set:
            ``kmeansinit train --init-images 0``); seeds, ZCA and centring statistics and the
            report's objectives then come from the first ``stat_images`` images.
        stat_patches: ``preprocess="zca"`` estimates each layer's patch covariance from at most about
            this many patches (a random, seeded share of every chunk; ``None``: all). 2**18 rows
            estimate a covariance of PaperNet's largest patch dimension (1,936) to a few percent,
            below the ``eps_zca`` regularization, at a fraction of the cost of all patches.
        zca_eps: ``preprocess="zca"``'s regularizer, relative to the mean eigenvalue of the patch
            covariance: ``W = V (L + zca_eps * mean(L))^(-1/2) V^T``. Smaller values whiten the
            weakest (highest-frequency) directions more.
        seed: seeds every random choice; same seed and images give the same weights.
        progress: show a progress bar.
        unsupported: what to do with a layer these options cannot cluster (``preprocess="zca"`` on a
            grouped conv, depthwise ones included; ``pairs`` with an odd number of filters per
            group): ``"skip"`` (default) leaves its weights as they are (a preset's ``base`` init)
            and names it in the report's ``skipped``; ``"error"`` raises ``ValueError``.

    Biases of the initialized layers are set to zero; every other parameter and buffer (BN running
    statistics included), every module's train/eval mode and ``requires_grad`` are left as they were.

    Returns:
        An :class:`InitReport` with each layer's objective before and after, cosine penalty, steps, seconds.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if (preprocess != "none" or pairs or orthogonal) and solver != "lloyd":
        raise ValueError("preprocess and pairs shape the Lloyd phase; they need solver='lloyd'")
    if mode == "layerwise" and solver != "lloyd":
        raise ValueError("mode='layerwise' runs spherical k-means (solver='lloyd'); solver='gradient' is joint only")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if cosine_weight < 0:
        raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}")
    if not zca_eps > 0:
        raise ValueError(f"zca_eps must be > 0, got {zca_eps}")
    if unsupported not in ("skip", "error"):
        raise ValueError(f"unsupported must be 'skip' or 'error', got {unsupported!r}")
    images = check_images(images, min_count=2)
    joint_lloyd = mode == "joint" and solver == "lloyd"
    if steps is None:
        # In joint mode the refinement follows, and Lloyd iterations past 5 add nothing there
        # (objectives swept with benchmarks/solver_sweep.py --lloyd 3,5,10).
        steps = (5 if joint_lloyd else 10) if solver == "lloyd" else 10_000
    if refine_steps is None:
        refine_steps = 50 if joint_lloyd else 0
    if mode == "layerwise":
        refine_steps, cosine_weight = 0, 0.0
    if steps < 0 or refine_steps < 0:
        raise ValueError("steps and refine_steps must be >= 0")
    lr = _default_lr(solver, reduction) if lr is None else lr
    accumulate = world()[1] if accumulate is None else accumulate
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    gen = torch.Generator().manual_seed(seed)

    found = find_layers(model, include_linear=include_linear, layers=layers)
    keep = {f"{n}.weight" for n in found} | {f"{n}.bias" for n in found if found[n].bias is not None}
    options = dict(mode=mode, solver=solver, steps=steps, refine_steps=refine_steps, batch_size=batch_size,
                   accumulate=accumulate,
                   lr=lr, momentum=momentum, cosine_weight=cosine_weight, reduction=reduction, scale=scale,
                   preprocess=preprocess, pairs=pairs, orthogonal=orthogonal, renormalize=renormalize, seed=seed, images=int(images.shape[0]),
                   **({"zca_eps": zca_eps} if preprocess == "zca" else {}))

    with preserved_state(model, keep), batchnorm_train_mode(model), torch.no_grad():
        order = forward_order(model, found, images[: min(batch_size, images.shape[0])])
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"layers must be >= 1 when an int, got {layers}")
            order = order[:layers]
        targets, skipped = [], {}
        for n in order:
            t = _target(n, found[n])
            reason = unsupported_reason(t.module, preprocess, pairs)
            if reason is None:
                targets.append(t)
            elif unsupported == "error":
                raise ValueError(f"layer {n}: {reason}")
            else:
                skipped[n] = reason
        if not targets:
            raise ValueError(f"no layer of {type(model).__name__} can be clustered with these options: "
                             + "; ".join(f"{n}: {r}" for n, r in skipped.items()))
        with Taps(model, {t.name: t.module for t in targets}, outputs=True) as taps:
            weights = {t.name: t.module.weight.detach().clone() for t in targets}
            # Report objectives on at most `stat_images` images: on a whole training set they would
            # cost more than the init.
            report_images = images[:stat_images]
            before, _, joint_before = _evaluate(taps, report_images, targets, weights, reduction, batch_size, cosine_weight)
            reports = [LayerReport(t.name, t.filters, objective_before=b) for t, b in zip(targets, before)]
            history: list = []
            total = (steps * len(targets) if solver == "lloyd" else steps) + refine_steps
            bar = _progress(total, progress, f"k-means init ({mode}, {solver})")
            try:
                if solver == "lloyd":
                    for t, rep in zip(targets, reports):
                        t0 = time.perf_counter()
                        inputs = _LayerInputs(taps, images, t.name, batch_size, cache_bytes)
                        _require_patches(inputs, t)
                        # More images than `stat_images`, or too many to keep this layer's inputs:
                        # statistics and seeds from the first `stat_images`, then `stream_passes`
                        # online passes over all of them, inputs recomputed and never kept, so that
                        # memory does not grow with the number of images.
                        online = world()[1] == 1 and (inputs.streaming or images.shape[0] > stat_images)
                        stats = inputs.head(stat_images) if online else inputs
                        if online:
                            inputs.cache_bytes = 0
                        if preprocess == "zca":
                            space = ZCASpace(t.module, stats, eps_zca=zca_eps, max_patches=stat_patches, seed=seed)
                        else:
                            space = RawSpace(t.module, _channel_mean(stats, t.module) if preprocess == "center" else None)
                        w, done = _lloyd(t, inputs, space, stream_passes if online else steps, gen, pairs=pairs,
                                         orthogonal=orthogonal, online=online, seeds=stats)
                        bar.update(steps)
                        # Later layers cluster the inputs they will really see: this layer's filters at
                        # their final scale (it matters where no BN follows, e.g. before a gate).
                        weights[t.name] = scale_filters_(w.to(t.module.weight.dtype), scale, t.module)
                        t.module.weight.copy_(weights[t.name])
                        if t.module.bias is not None:
                            t.module.bias.zero_()
                        rep.steps, rep.seconds = done, time.perf_counter() - t0
                    if refine_steps:
                        t0 = time.perf_counter()
                        weights = _gradient_phase(taps, images, targets, weights, steps=refine_steps, lr=lr,
                                                  optimizer="adam", momentum=momentum, batch_size=batch_size, decay=True,
                                                  cosine_weight=cosine_weight, reduction=reduction,
                                                  renormalize=renormalize, gen=gen, bar=bar, accumulate=accumulate,
                                                  history=history)
                        for rep in reports:
                            rep.steps += refine_steps
                            rep.seconds += (time.perf_counter() - t0) / len(reports)
                else:
                    t0 = time.perf_counter()
                    for t in targets:
                        # The gradient solver samples the whole image set, so count over all images.
                        _require_patches(_LayerInputs(taps, images, t.name, batch_size, cache_bytes), t)
                    weights = {t.name: scale_filters_(weights[t.name].clone(), scale, t.module) for t in targets}
                    weights = _gradient_phase(taps, images, targets, weights, steps=steps, lr=lr, optimizer="sgd",
                                              momentum=momentum, batch_size=batch_size, cosine_weight=cosine_weight,
                                              reduction=reduction, renormalize=renormalize, gen=gen, bar=bar,
                                              accumulate=accumulate, history=history)
                    for rep in reports:
                        rep.steps, rep.seconds = steps, (time.perf_counter() - t0) / len(reports)
            finally:
                bar.close()
            final = {}
            for t in targets:
                w = weights[t.name]
                if not torch.isfinite(w).all() or bool((w.flatten(1).norm(dim=1) <= _EPS).any()):
                    raise FloatingPointError(f"layer {t.name}: k-means produced a zero or non-finite filter")
                final[t.name] = scale_filters_(w.clone(), scale, t.module)
            if scale == "variance":
                _calibrate_variance_(taps, report_images, targets, final, batch_size)
            after, pens, joint_after = _evaluate(taps, report_images, targets, final, reduction, batch_size, cosine_weight)
            for t, rep, a, p in zip(targets, reports, after, pens):
                rep.objective_after, rep.cosine_after = a, p
    # Written after preserved_state restored everything else, so only these tensors change.
    with torch.no_grad():
        for t in targets:
            t.module.weight.copy_(final[t.name])
            if t.module.bias is not None:
                t.module.bias.zero_()
    return InitReport(method=f"kmeans-{mode}", layers=reports, options=options,
                      seconds=time.perf_counter() - start, joint_before=joint_before, joint_after=joint_after,
                      history=history, skipped=skipped)


def unsupported_reason(module: nn.Module, preprocess: str, pairs: bool) -> str | None:
    """Why k-means with these options cannot set ``module`` (None: it can)."""
    groups = 1 if isinstance(module, nn.Linear) else module.groups
    if preprocess == "zca" and groups > 1:
        kind = "a depthwise" if module.weight.shape[1] == 1 else "a grouped"
        return f"{kind} conv (groups={groups}); ZCA whitening is defined for ungrouped layers"
    if pairs and (module.weight.shape[0] // groups) % 2:
        return f"pairs need an even number of filters per group, got {module.weight.shape[0] // groups}"
    return None


def _require_patches(inputs: _LayerInputs, t: _Target) -> None:
    """A clear error when the images give a layer fewer patches per bank than it has filters per bank."""
    n = inputs.count_patches(t.module)
    if n < t.per_bank:
        raise ValueError(f"layer {t.name}: {n} input patches for {t.per_bank} filters per bank; give more images")


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
