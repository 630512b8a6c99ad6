"""Spherical k-means (Lloyd) on one layer's input patches: the batch solver and the streaming one.

Both work in convolution form in a patch ``space`` (:mod:`kmeansinit.init.whiten`): assignments from
one convolution with the centroids, each cluster's sum of assigned patches from one conv
weight-gradient, counts by ``bincount``. :func:`lloyd` runs batch iterations over inputs it may keep in
memory; :func:`lloyd_online` makes passes over inputs recomputed chunk by chunk (many images), moving
the centroids after every chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import all_gather_object, all_reduce_
from ..objectives import unit_filters
from .targets import _EPS, _Target, _expand, _to_layer_order
from .whiten import ZCASpace


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


def _first_centroids(t: _Target, seeds, space, rand, partner, start: Tensor | None) -> Tensor:
    everything = torch.ones(t.filters, dtype=torch.bool, device=t.perm.device)
    c = unit_filters(_pick_patches(t, seeds, space, everything, rand()) if start is None else start)
    return unit_filters(c - c[partner]) if partner is not None else c


def _accumulate(t: _Target, space, x: Tensor, c: Tensor, sums: Tensor, counts: Tensor, bank_offset: Tensor) -> None:
    """Add one chunk's assignments to ``sums`` (layer layout, in ``space``) and ``counts`` (conv layout);
    ``bank_offset``: each bank's first filter index, shaped to the responses' bank axis."""
    r = space.responses(x, c)
    idx = r.argmax(dim=2, keepdim=True)
    # Counts per filter (conv layout) from the indices: one pass over them, not over a mask.
    n = torch.bincount((idx + bank_offset).reshape(-1), minlength=t.filters).to(counts.dtype)
    counts += n
    pw = space.patch_weights(x)
    mask = torch.zeros_like(r).scatter_(2, idx, 1.0 if pw is None else pw.to(r.dtype).expand(idx.shape))
    sums += space.weighted_sums(x, mask, n, c)


def _centroids_from_sums(sums: Tensor, counts: Tensor, partner) -> tuple[Tensor, Tensor, Tensor]:
    """Unit cluster sums (pairs: the partner's patches counted with their sign flipped), the filters
    with no patch (``dead``), and those of them to re-seed (``want``; pairs: the first of each pair)."""
    if partner is not None:
        sums, counts = sums - sums[partner], counts + counts[partner]
    new = unit_filters(sums)
    dead = (counts == 0) | (sums.flatten(1).norm(dim=1) <= _EPS)
    want = dead & (torch.arange(dead.numel(), device=dead.device) < partner) if partner is not None else dead
    return new, dead, want


def _reseeded(new: Tensor, want: Tensor, seeded: Tensor, partner) -> Tensor:
    """``new`` with the ``want``-ed filters taken from ``seeded`` (and, with pairs, their partners
    from its negative)."""
    if partner is not None:
        seeded[partner[want]] = -seeded[want]
        want = want | want[partner]
    return torch.where(_expand(want, new), seeded, new)


def _settled(new: Tensor, c: Tensor) -> bool:
    """Converged: no centroid moved by 1e-6."""
    return float((new - c).flatten(1).norm(dim=1).max()) < 1e-6


def _close_pass(t: _Target, space, sums: Tensor, counts: Tensor, partner, seeds, rand) -> Tensor:
    """New centroids from a pass's sums over every rank; empty clusters re-seeded from patches."""
    all_reduce_(sums)
    all_reduce_(counts)
    new, dead, want = _centroids_from_sums(sums, _to_layer_order(t, counts), partner)
    if not bool(dead.any()):
        return new
    if partner is not None or isinstance(space, ZCASpace):
        score = rand()  # far-from-centroid scores need raw patch norms; random patches do here
    else:
        live_conv = (~dead)[t.perm].reshape(1, t.banks, t.per_bank, 1)

        def score(ci, x, sq, new=new, live_conv=live_conv):
            r = space.responses(x, new).masked_fill(~live_conv, -math.inf)
            return r.amax(dim=2) / sq.clamp_min(_EPS).sqrt()

    return _reseeded(new, want, unit_filters(_pick_patches(t, seeds, space, want, score)), partner)


def _filters(t: _Target, space, c: Tensor, orthogonal: bool, partner) -> Tensor:
    w = unit_filters(space.to_raw(c))
    return orthogonalize_banks(t, w, partner) if orthogonal else w


def _solve(t, inputs, space, iters, gen, pairs, orthogonal, seeds, start, online) -> tuple[Tensor, int]:
    seeds = inputs if seeds is None else seeds
    partner = _partners(t) if pairs else None
    rand = _random_scores(gen)
    c = _first_centroids(t, seeds, space, rand, partner, start)
    bank_offset = (torch.arange(t.banks, device=c.device) * t.per_bank).reshape(1, -1, 1, 1)
    done = 0
    for _ in range(iters):
        sums = torch.zeros_like(c)
        counts = torch.zeros(t.filters, dtype=torch.float64, device=c.device)
        moving = c
        for x in inputs:
            _accumulate(t, space, x, moving, sums, counts, bank_offset)
            if online:  # mini-batch k-means: centroids follow the pass's running sums (step 1/count)
                run = sums - sums[partner] if pairs else sums
                moving = torch.where(_expand(run.flatten(1).norm(dim=1) > _EPS, moving), unit_filters(run), moving)
        new = _close_pass(t, space, sums, counts, partner, seeds, rand)
        done += 1
        c, settled = new, _settled(new, c)
        if settled:
            break
    return _filters(t, space, c, orthogonal, partner), done


def lloyd(t: _Target, inputs, space, iters: int, gen: torch.Generator, *, pairs: bool = False,
          orthogonal: bool = False, seeds=None, start: Tensor | None = None) -> tuple[Tensor, int]:
    """Batch spherical k-means on one layer's input patches (in ``space``): ``iters`` Lloyd iterations
    at most (fewer once no centroid moves by 1e-6); returns raw-patch unit filters and iterations run.

    Each iteration assigns every patch to its best centroid (``argmax_k <x_i, c_k>``; with ``pairs``
    each filter's partner is its negative, so a ReLU after the layer passes both signs of every
    direction) and moves each centroid to the normalized sum of its patches. ``seeds``: inputs the
    first and re-seeded centroids are picked from (default ``inputs``); ``start``: first centroids
    (layer layout, in ``space``) instead of random patches (tests). ``orthogonal``: the closest
    orthonormal set per bank at the end (:func:`orthogonalize_banks`).
    """
    return _solve(t, inputs, space, iters, gen, pairs, orthogonal, seeds, start, online=False)


def lloyd_online(t: _Target, inputs, space, passes: int, gen: torch.Generator, *, pairs: bool = False,
                 orthogonal: bool = False, seeds=None, start: Tensor | None = None) -> tuple[Tensor, int]:
    """Streaming spherical k-means for inputs recomputed from many images: ``passes`` passes, the
    centroids moving after every chunk to the running sums of their patches over the pass
    (mini-batch k-means with per-cluster step 1/count), so one pass does the work of many batch
    iterations and no input is kept. ``seeds`` (a smaller set of inputs) supplies the first and
    re-seeded centroids. Same return as :func:`lloyd`."""
    return _solve(t, inputs, space, passes, gen, pairs, orthogonal, seeds, start, online=True)


def lloyd_rows(t: _Target, space: ZCASpace, iters: int, gen: torch.Generator, *, pairs: bool = False,
               orthogonal: bool = False, start: Tensor | None = None) -> tuple[Tensor, int]:
    """Batch spherical k-means on the sampled patch rows ``space.rows`` (``ZCASpace(keep_rows=N)``), in
    matrix form; same iterations, pairs, re-seeding and return as :func:`lloyd`.

    :func:`lloyd` visits every patch position of every image in convolution form, each iteration a
    pass over the layer's inputs; here an iteration is two products with an ``(N, D)`` matrix of
    contrast-normalized rows ``p'``, never whitened explicitly: ``<z, c> = <p', W^T c> - <m, W^T c>``
    for ``z = W (p' - m)``, and a cluster's sum of ``z`` is ``W (sum p' - n m)``. On the same rows
    (every patch) it computes what :func:`lloyd` computes; on a sample it clusters that sample.
    """
    rows = space.rows
    if rows is None:
        raise ValueError(f"layer {t.name}: lloyd_rows needs the rows a ZCASpace keeps (keep_rows=N)")
    if t.banks != 1:
        raise ValueError(f"layer {t.name}: lloyd_rows clusters ungrouped layers only")
    k, shape, dtype = t.filters, t.module.weight.shape, t.module.weight.dtype
    # In the rows' precision (float32 for a float32 model): W and m are formed in float64, but each
    # iteration's two (k, D) x (D, D) products ran at half the float32 rate, about a fifth of the work of
    # a wide 1x1 layer's iteration. The float32 result is tested against the float64 one.
    W, m = space.W.to(rows.dtype), space.m.to(rows.dtype)
    partner = _partners(t) if pairs else None
    ok = torch.nonzero(rows.norm(dim=1) > _EPS).reshape(-1)  # a constant patch normalizes to 0

    def draw(n: int) -> Tensor:
        if ok.numel() < n:
            raise ValueError(f"layer {t.name}: fewer non-zero input patches than filters; give more (or more varied) images")
        chosen = ok[torch.randperm(ok.numel(), generator=gen)[:n].to(ok.device)]
        return unit_filters((rows[chosen] - m) @ W.t())

    c = draw(k) if start is None else unit_filters(start.flatten(1).to(rows.dtype))
    if partner is not None:
        c = unit_filters(c - c[partner])
    done = 0
    for _ in range(iters):
        wc = c @ W  # rows of W^T c_k
        r = rows @ wc.t() - wc @ m
        idx = r.argmax(dim=1)
        counts = torch.bincount(idx, minlength=k).to(rows.dtype)
        raw = torch.zeros(k, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)
        new, dead, want = _centroids_from_sums((raw - counts.reshape(-1, 1) * m) @ W.t(), counts, partner)
        if bool(dead.any()):
            seeded = torch.zeros_like(new)
            seeded[want] = draw(int(want.sum()))
            new = _reseeded(new, want, seeded, partner)
        done += 1
        c, settled = new, _settled(new, c)
        if settled:
            break
    return _filters(t, space, c.to(dtype).reshape(shape), orthogonal, partner), done
