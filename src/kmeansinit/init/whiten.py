"""Patch spaces for k-means: raw patches, or contrast-normalized and ZCA-whitened patches mapped back.

Coates & Ng (2012) run k-means on patches ``p`` that are first
normalized per patch, ``p' = P p / s(p)`` with ``P = I - 11^T / D`` (remove the patch mean) and
``s(p) = sqrt(var(p) + eps_norm)``, then ZCA-whitened, ``z = W (p' - m)`` with
``W = V (L + eps_zca)^(-1/2) V^T`` from the covariance of ``p'``. A centroid ``c`` found in
``z``-space acts on raw patches through the raw filter ``w = P W^T c`` (``W^T = W`` for ZCA):

    <z, c> = <p, P W^T c> / s(p) - <m, W^T c>

The second term does not depend on the patch, and ``s(p) > 0``, so the filter ``w`` ranks patches
as ``c`` does, up to a per-filter offset which BN (or a bias) absorbs. Everything except the
covariance (one chunked unfold) stays in convolution form.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..objectives import _conv_geometry, filter_responses, masked_patch_sums, patch_sq_norms, patch_sums

__all__ = ["RawSpace", "ZCASpace", "unfold_patches", "patch_count", "add_upper_gram_", "symmetrize_upper_"]


class RawSpace:
    """k-means on the layer's own patches (optionally of a per-channel-centred input)."""

    def __init__(self, layer: nn.Module, mean: Tensor | None = None):
        self.layer, self.mean = layer, mean

    def prep(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        shape = (-1,) if isinstance(self.layer, nn.Linear) else (1, -1, *([1] * (x.dim() - 2)))
        return x - self.mean.reshape(shape)

    def responses(self, x: Tensor, c: Tensor) -> Tensor:
        return filter_responses(self.prep(x), self.layer, c, normalize=False)

    def patch_weights(self, x: Tensor) -> Tensor | None:
        """Per-position factor of each patch in a cluster sum (None: every patch counts 1)."""
        return None

    def weighted_sums(self, x: Tensor, mask: Tensor, counts: Tensor, like: Tensor) -> Tensor:
        """Cluster sums from a mask already multiplied by :meth:`patch_weights`; ``counts`` per filter."""
        return masked_patch_sums(self.prep(x), self.layer, mask, like)

    def sums(self, x: Tensor, mask: Tensor, like: Tensor) -> Tensor:
        return masked_patch_sums(self.prep(x), self.layer, mask, like)

    def sq_norms(self, x: Tensor) -> Tensor:
        return patch_sq_norms(self.prep(x), self.layer)

    def to_raw(self, c: Tensor) -> Tensor:
        return c


def _padded(x: Tensor, layer: nn.Conv2d) -> Tensor:
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise ValueError(f"preprocess='zca' supports ungrouped Conv2d and Linear layers, got {layer}")
    x, (ph, pw) = _conv_geometry(x, layer)
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _windows(x: Tensor, layer: nn.Conv2d) -> Tensor:
    """A view ``(N, C, Ho, Wo, kH, kW)`` of every patch of the (padded) input: no copy."""
    xp = _padded(x, layer)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    v = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    return v[..., ::dh, ::dw]


def patch_count(x: Tensor, layer: nn.Module) -> int:
    """Number of patch rows :func:`unfold_patches` returns for ``x``."""
    if isinstance(layer, nn.Linear):
        return x.numel() // x.shape[-1]
    v = _windows(x[:1], layer)
    return x.shape[0] * v.shape[2] * v.shape[3]


def unfold_patches(x: Tensor, layer: nn.Module, rows: Tensor | None = None) -> Tensor:
    """Patches of ``layer`` as rows (image-major, then position; entries channel-major, as
    ``F.unfold``), for ungrouped Conv2d and Linear only: used for covariances. With ``rows`` (indices
    into that order) only those patches are gathered, from a strided view: no full im2col."""
    if isinstance(layer, nn.Linear):
        p = x.reshape(-1, x.shape[-1])
        return p if rows is None else p[rows]
    v = _windows(x, layer)
    n, c, ho, wo = v.shape[:4]
    if rows is None:
        return v.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)
    img, pos = rows // (ho * wo), rows % (ho * wo)
    return v[img, :, pos // wo, pos % wo].reshape(rows.shape[0], -1)


#: Columns per block row of :func:`add_upper_gram_`: narrow enough that the blocks below the diagonal
#: it skips are most of the lower half (PaperNet's 1,936-dimensional second layer: 8 block rows),
#: wide enough that each product still runs at full GEMM speed.
GRAM_BLOCK = 256


def add_upper_gram_(out: Tensor, p: Tensor, block: int | None = None) -> Tensor:
    """``out += p^T p`` on and above the diagonal blocks only, in place; returns ``out``.

    The Gram matrix of the patch rows is symmetric, so its lower part is a mirror: block row ``i``
    (``block`` columns, default :data:`GRAM_BLOCK`, from its diagonal block to the last column) is
    one product ``p[:, Bi]^T p[:, Bi:]``, and the full product's work (``N D^2`` multiply-adds, the
    ZCA statistics' largest cost) falls to about ``N D^2 (1 + block / D) / 2``. Each entry is the same sum of the same products as in ``p^T p``.
    Entries below the diagonal blocks are left as they are; :func:`symmetrize_upper_` fills them
    from the upper triangle once the sums are complete. Each product is computed in ``p``'s dtype
    and added into ``out``'s (float64 for the covariance): no float64 copy of ``p``.
    """
    d, block = p.shape[1], block or GRAM_BLOCK
    for s in range(0, d, block):
        out[s:s + block, s:] += p[:, s:s + block].t() @ p[:, s:]
    return out


def symmetrize_upper_(m: Tensor) -> Tensor:
    """``m``'s upper triangle mirrored into its lower one, in place (one temporary of the strict upper part)."""
    upper = torch.triu(m, diagonal=1)
    return m.triu_().add_(upper.t())


class ZCASpace:
    """k-means on contrast-normalized, ZCA-whitened patches; filters mapped back to raw patches."""

    def __init__(self, layer: nn.Module, chunks, eps_norm: float = 1e-2, eps_zca: float = 1e-2,
                 max_patches: int | None = None, seed: int = 0, eigh_dtype: torch.dtype = torch.float64,
                 whitening: str = "zca", keep_rows: int | None = None):
        """Patch mean and covariance from ``chunks`` (layer inputs): all patches, or at most about
        ``max_patches`` of them, an equal random share from each chunk, drawn by ``(seed, chunk index)``
        so that a distributed init picks the rows a single process picks. The covariance is always
        accumulated in float64; ``eigh_dtype`` is the precision of its eigendecomposition (float32 is
        about twice as fast on the CPU; its eigenvalue errors, about 1e-7 of the largest, sit far
        below the regularizer ``eps_zca * mean(L)`` every eigenvalue gets).

        ``whitening="cholesky"``: instead of ZCA's symmetric ``W = (C + eps I)^(-1/2)``, the whitening
        ``W = L^(-1)`` from the Cholesky factor ``C + eps I = L L^T``. Both satisfy ``W^T W = (C + eps I)^(-1)``,
        so one whitened space is a rotation of the other (``W_chol = Q W_zca``, ``Q`` orthogonal): every
        inner product between whitened vectors, hence every assignment and every raw filter
        ``P W^T c``, is the same in exact arithmetic, for a fraction of the cost (no
        eigendecomposition: PaperNet's 1,936-dimensional second layer takes seconds to diagonalize on
        a CPU). In float32 the two round differently, which flips near-tie assignments: on real
        images deeper layers end in other local optima (see ``KMeansOptions.whitening``).

        ``keep_rows``: also keep about this many contrast-normalized patch rows (an equal, seeded random
        share of every chunk) as ``self.rows``, ``(N, D)``, for :func:`~kmeansinit.init.lloyd.lloyd_rows`."""
        if whitening not in ("zca", "cholesky"):
            raise ValueError(f"whitening must be 'zca' or 'cholesky', got {whitening!r}")
        self.layer, self.eps_norm = layer, eps_norm
        self._scales: dict[int, tuple] = {}
        self._last_raw = None
        from ..distributed import all_reduce_

        w = layer.weight
        dim = w[0].numel()
        total = torch.zeros(dim, dtype=torch.float64, device=w.device)
        outer = torch.zeros(dim, dim, dtype=torch.float64, device=w.device)
        count = torch.zeros((), dtype=torch.float64, device=w.device)
        indexed = chunks.indexed() if hasattr(chunks, "indexed") else enumerate(chunks)
        def per_chunk(total_rows):  # an equal share of each chunk (None: every row)
            if total_rows is None:
                return None
            return max(1, -(-total_rows // (getattr(chunks, "n_chunks", None) or len(chunks))))

        share, keep_share = per_chunk(max_patches), per_chunk(keep_rows)
        # Patch rows are gathered and reduced a block at a time (about 16 MB each), so the memory of
        # the statistics does not depend on the chunk's patch count (PaperNet's second layer: 16,384
        # patches of 1,936 values per 64 images).
        block = max(1, 2**22 // dim)
        kept = []
        for ci, x in indexed:
            rows = patch_count(x, layer)
            sampled = share is not None and rows > share
            if sampled:
                g = torch.Generator().manual_seed(seed * 1_000_003 + ci)
                picked = torch.randperm(rows, generator=g)[:share].to(x.device)
            else:
                picked = torch.arange(rows, device=x.device)
            # Rows to keep come free from the statistics' own: all of them when they are no more than
            # the share to keep, else the first of them when they were drawn at random; otherwise
            # (every row used, more than the share) a seeded draw of their own.
            free = keep_share is not None and (picked.numel() <= keep_share or sampled)
            reuse = keep_share if free else 0
            for sub in picked.split(block):
                # In the inputs' dtype (a float32 GEMM is twice a float64 one on CPU), summed in float64.
                p = self._normalize(unfold_patches(x, layer, sub))
                total += p.sum(0, dtype=torch.float64)
                add_upper_gram_(outer, p)
                count += p.shape[0]
                if reuse:
                    kept.append(p[:reuse].clone())
                    reuse -= kept[-1].shape[0]
            if keep_share is not None and not free:
                g = torch.Generator().manual_seed(seed * 1_000_003 + ci + 500_009)
                pick = torch.randperm(rows, generator=g)[:keep_share].to(x.device)
                kept.append(self._normalize(unfold_patches(x, layer, pick)))
        self.rows = torch.cat(kept) if kept else None
        for t in (total, outer, count):
            all_reduce_(t)
        self.m = total / count
        # In place: a D x D float64 matrix is 30 MB for PaperNet's second layer, and each copy counts.
        cov = symmetrize_upper_(outer).div_(count).addr_(self.m, self.m, alpha=-1)
        if whitening == "cholesky":
            # eps_zca relative to the mean eigenvalue (the trace over D), as below.
            eps = eps_zca * float(cov.diagonal().sum().clamp_min(0)) / dim
            cov.diagonal().add_(eps)
            chol = torch.linalg.cholesky(cov)
            del cov, outer
            self.W = torch.linalg.solve_triangular(chol, torch.eye(dim, dtype=chol.dtype, device=chol.device),
                                                   upper=False)
        else:
            evals, evecs = torch.linalg.eigh(cov.to(eigh_dtype))
            evals, evecs = evals.double(), evecs.double()
            del cov, outer
            # eps_zca relative to the mean eigenvalue, so it means the same for every layer's scale.
            eps = eps_zca * float(evals.clamp_min(0).mean())
            self.W = (evecs * (evals.clamp_min(0) + eps).rsqrt()) @ evecs.t()
        self.dim = dim

    def _normalize(self, p: Tensor) -> Tensor:
        # One pass for both moments, one new tensor (the rows are 16 MB blocks; each pass counts).
        var, mean = torch.var_mean(p, dim=1, correction=0, keepdim=True)
        return (p - mean).div_(var.add_(self.eps_norm).sqrt_())

    def whiten(self, patches: Tensor) -> Tensor:
        """z for raw patch rows (the reference path, used by tests and the covariance)."""
        return (self._normalize(patches.double()) - self.m) @ self.W.t()

    def _scale(self, x: Tensor) -> Tensor:
        """Per-position ``s(p)``, shape (N, 1, 1, L), from conv-form patch moments.

        It depends on the inputs only, and a Lloyd step asks for it twice per chunk (responses,
        then sums), every step for cached inputs: kept while ``x`` lives.
        """
        key = id(x)
        hit = self._scales.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        s = self._compute_scale(x)
        self._scales[key] = (weakref.ref(x), s)
        weakref.finalize(x, self._scales.pop, key, None)
        return s

    def _compute_scale(self, x: Tensor) -> Tensor:
        d = self.dim
        sq = patch_sq_norms(x, self.layer)
        mean = patch_sums(x, self.layer) / d
        var = (sq / d - mean.square()).clamp_min(0)
        return torch.sqrt(var + self.eps_norm)

    def _raw_and_offset(self, c: Tensor) -> tuple[Tensor, Tensor]:
        # A Lloyd iteration asks for the same centroids' filters once per chunk: kept for the last c.
        key = (id(c), c._version)
        if self._last_raw is not None and self._last_raw[0] == key and self._last_raw[1]() is c:
            return self._last_raw[2]
        wc = c.flatten(1).double() @ self.W  # rows of W^T c_k (W is not symmetric under whitening="cholesky")
        raw = (wc - wc.mean(dim=1, keepdim=True)).to(c.dtype).reshape(c.shape)  # P W^T c
        out = (raw, wc @ self.m)
        self._last_raw = (key, weakref.ref(c), out)
        return out

    def to_raw(self, c: Tensor) -> Tensor:
        return self._raw_and_offset(c)[0]

    def offset(self, c: Tensor) -> Tensor:
        return self._raw_and_offset(c)[1]

    def responses(self, x: Tensor, c: Tensor) -> Tensor:
        # <z, c> = <p, PWc>/s(p) - <m, Wc>; multiplied by s(p) > 0, which keeps each patch's argmax.
        raw, offset = self._raw_and_offset(c)
        r = filter_responses(x, self.layer, raw, normalize=False)
        return r - self._scale(x) * offset.to(r.dtype).reshape(1, 1, -1, 1)

    def patch_weights(self, x: Tensor) -> Tensor:
        return self._scale(x).reciprocal()

    def weighted_sums(self, x: Tensor, mask: Tensor, counts: Tensor, like: Tensor) -> Tensor:
        """sum_i mask_ik z_i = W (P sum_i mask_ik p_i / s_i - n_k m), ``mask`` already holding 1 / s_i."""
        raw = masked_patch_sums(x, self.layer, mask, like).flatten(1).double()
        raw = raw - raw.mean(dim=1, keepdim=True)
        n = counts.reshape(-1, 1).double()
        return ((raw - n * self.m) @ self.W.t()).to(like.dtype).reshape(like.shape)

    def sums(self, x: Tensor, mask: Tensor, like: Tensor) -> Tensor:
        """sum_i mask_ik z_i for a 0/1 ``mask`` (the shape of the responses)."""
        return self.weighted_sums(x, mask * self.patch_weights(x), mask.sum(dim=(0, 3)).reshape(-1), like)

    def sq_norms(self, x: Tensor) -> Tensor:
        # Used to skip zero patches: a constant patch normalizes to 0 and carries no direction.
        sq = patch_sq_norms(x, self.layer)
        mean = patch_sums(x, self.layer) / self.dim
        return (sq - self.dim * mean.square()).clamp_min(0)
