"""The single-layer network of Coates, Lee & Ng (AISTATS 2011), as a trainable PyTorch model.

Coates et al. learn 1,600 filters of 6 x 6 pixels by k-means on whitened patches, encode every
position of an image with them (stride 1), sum-pool each of the four quadrants and fit a linear
classifier to the 6,400 features: 77.9% on CIFAR-10 (79.6% with 4,000 filters), the classic case
where k-means filters beat random ones. Here the encoder is ``conv -> BN -> ReLU`` (BN's shift is the threshold of
their soft encoders), the pooling a 2 x 2 average, and the classifier a linear layer, so the same
net can be initialized by any method of :func:`kmeansinit.initialize_`, probed with its conv frozen
(:mod:`kmeansinit.probe`), or trained end to end. ``patch_norm=True`` contrast-normalizes every
input patch before the filters (:class:`PatchNormConv2d`), as Coates et al. do when they encode.

``coates_triangle`` (model ``coates-triangle``) is their encoder itself: a fixed layer that turns
every patch into its contrast-normalized, ZCA-whitened vector ``z`` (:class:`PatchWhitening`, fitted
on unlabelled images), then the triangle code ``max(0, mean_j ||z - c_j|| - ||z - c_k||)`` over the
centroids ``c_k`` (:class:`TriangleConv2d`, whose filter directions an init sets: ``kmeans-layerwise``
is spherical k-means on those whitened patches).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..objectives import patch_sq_norms, patch_sums, unit_filters

__all__ = ["SingleLayerNet", "PatchNormConv2d", "PatchWhitening", "TriangleConv2d", "coates", "coates_triangle",
           "fit_whitening_"]


def _patch_normalized_conv(x: Tensor, geometry: nn.Conv2d, w: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """``(conv(x, w) - mean(p) sum(w)) / sqrt(var(p) + eps) + b``: the filters ``w`` applied to every
    contrast-normalized patch ``(p - mean(p)) / sqrt(var(p) + eps)``, with ``geometry``'s window."""
    d = w[0].numel()
    y = geometry._conv_forward(x, w, None)
    with torch.autocast(x.device.type, enabled=False):
        xm = x if x.dtype in (torch.float32, torch.float64) else x.float()
        shape = (y.shape[0], 1, *y.shape[2:])
        mean = patch_sums(xm, geometry).reshape(shape) / d  # (N, 1, H', W'): each patch's mean
        var = (patch_sq_norms(xm, geometry).reshape(shape) / d - mean.square()).clamp_min(0)
        scale = torch.rsqrt(var + eps)
    y = (y - (mean * w.sum(dim=(1, 2, 3)).reshape(1, -1, 1, 1)).to(y.dtype)) * scale.to(y.dtype)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1).to(y.dtype)


class PatchNormConv2d(nn.Conv2d):
    """A conv of contrast-normalized patches: each input patch ``p`` (all ``C k k`` values under a
    filter) is replaced by ``(p - mean(p)) / sqrt(var(p) + eps)`` before the filters are applied.

    Coates, Lee & Ng (2011) normalize every patch's brightness and contrast this way both when they
    learn their k-means dictionary and when they encode an image with it. The k-means inits here
    learn on patches normalized the same way (with this layer's default ``eps``, 1e-2, the
    ``eps_norm`` of :class:`~kmeansinit.init.whiten.ZCASpace`) and map each centroid back to a raw filter ``w``, so
    that a plain conv ranks patches as the centroid does only up to each patch's contrast
    ``sqrt(var(p) + eps)``; this layer divides that contrast out. It is computed in convolution
    form, without a patch matrix: ``(conv(x, w) - mean(p) sum(w)) / sqrt(var(p) + eps) + b``, the
    patch moments by :func:`~kmeansinit.objectives.patch_sums` (as the init's own), in float32 at least (under
    bf16 autocast ``E[x^2] - E[x]^2`` would cancel to noise). The weight and bias are an
    ``nn.Conv2d``'s, so every init treats it as one (they see the raw input patches).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", eps: float = 1e-2,
                 device=None, dtype=None) -> None:
        if groups != 1:
            raise ValueError(f"PatchNormConv2d normalizes whole patches: groups must be 1, got {groups}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _patch_normalized_conv(x, self, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class PatchWhitening(nn.Module):
    """Every ``k x k`` patch as its contrast-normalized, ZCA-whitened vector: ``C k^2`` output channels.

    A patch ``p`` (its ``D = C k^2`` values) becomes ``z = W (p~ - m)``, where
    ``p~ = (p - mean(p)) / sqrt(var(p) + eps_norm)`` and ``W = V (L + zca_eps * mean(L))^(-1/2) V^T``, ``m``
    from the mean and covariance ``V L V^T`` of ``p~`` over the patches of the images :meth:`fit_` is
    given: the preprocessing of Coates, Lee & Ng (2011) before k-means and before encoding, computed
    as the ``zca`` k-means init computes it (:class:`~kmeansinit.init.whiten.ZCASpace`, the same
    defaults but ``zca_eps``: 0.1 here, Coates et al.'s 0.1 on patches of unit variance, where the init
    uses 0.01). Weight and bias are buffers, not parameters: no init touches them (inits set conv and
    linear layers) and training leaves them; :meth:`fit_` sets them. It must see the net's input
    images, so it is a net's first layer.
    """

    def __init__(self, in_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, *,
                 eps_norm: float = 1e-2, zca_eps: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        if in_channels < 1 or kernel_size < 1 or stride < 1 or padding < 0:
            raise ValueError(f"in_channels, kernel_size and stride must be >= 1 and padding >= 0, got "
                             f"{in_channels}, {kernel_size}, {stride}, {padding}")
        if not eps_norm > 0 or not zca_eps > 0:
            raise ValueError(f"eps_norm and zca_eps must be > 0, got {eps_norm}, {zca_eps}")
        d = in_channels * kernel_size * kernel_size
        self.in_channels, self.out_channels, self.kernel_size = in_channels, d, kernel_size
        self.stride, self.padding, self.eps_norm, self.zca_eps = stride, padding, eps_norm, zca_eps
        self.register_buffer("weight", torch.zeros(d, in_channels, kernel_size, kernel_size, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(d, device=device, dtype=dtype))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        # The patch-moment helpers read the window off a conv layer. This one holds no data (meta
        # device) and sits in a tuple, so it is no submodule: no init or optimizer ever sees it.
        self._geometry = (nn.Conv2d(in_channels, 1, kernel_size, stride, padding, device="meta"),)

    @torch.no_grad()
    def fit_(self, images: Tensor, *, max_patches: int | None = None, seed: int = 0,
             batch_size: int = 256) -> "PatchWhitening":
        """``W`` and ``m`` from the patches of ``images`` ``(N, C, H, W)``, the net's input: all of
        them, or about ``max_patches`` drawn by ``seed``. Returns ``self``."""
        from ..init.whiten import ZCASpace

        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != self.in_channels:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"PatchWhitening.fit_: images must be (N, {self.in_channels}, H, W), got {got}")
        conv = nn.Conv2d(self.in_channels, 1, self.kernel_size, self.stride, self.padding, bias=False,
                         device=images.device, dtype=images.dtype)
        space = ZCASpace(conv, list(images.split(batch_size)), eps_norm=self.eps_norm, eps_zca=self.zca_eps,
                         max_patches=max_patches, seed=seed)
        # ZCASpace's patch rows are channel-major (as F.unfold), the order of a conv weight's flatten(1).
        self.weight.copy_(space.W.reshape(self.weight.shape))
        self.bias.copy_(-(space.W @ space.m))
        self.fitted.fill_(True)
        return self

    def forward(self, x: Tensor) -> Tensor:
        # Under torch.fx tracing (the k-means init traces the net) the buffer may be a symbol: no check.
        if not isinstance(self.fitted, torch.fx.Proxy) and not bool(self.fitted):
            raise RuntimeError("PatchWhitening is not fitted: call fit_(images) (or fit_whitening_(model, images)) "
                               "before using the net; kmeansinit train and probe do")
        return _patch_normalized_conv(x, self._geometry[0], self.weight, self.bias, self.eps_norm)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, eps_norm={self.eps_norm}, zca_eps={self.zca_eps}")


def fit_whitening_(model: nn.Module, images: Tensor, **kw) -> int:
    """Fit every :class:`PatchWhitening` of ``model`` to ``images`` (the net's input; the layer is a
    net's first); returns how many. ``kw`` go to :meth:`PatchWhitening.fit_`."""
    found = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    for m in found:
        m.fit_(images, **kw)
    return len(found)


class TriangleConv2d(nn.Conv2d):
    """Coates et al.'s triangle encoder: ``f_k(z) = max(0, mean_j d_j - d_k)`` with ``d_k = ||z - c_k||``,
    at every position of its input ``z`` (a 1 x 1 conv over ``in_channels``).

    The centroids are the filters' directions, ``c_k = w_k / ||w_k||``, as spherical k-means finds
    them (unit vectors), so the norm an init gives a filter changes nothing; ``d_k^2`` is computed as
    ``||z||^2 + 1 - 2 <z, c_k>``, in float32 at least (the code is a small difference of distances).
    About half the codes are zero at a position: those of the centroids farther than average.
    """

    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, 1, bias=False, device=device, dtype=dtype)

    def forward(self, z: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
            c = unit_filters(self.weight.to(zf.dtype))
            a = self._conv_forward(zf, c, None)  # <z, c_k>
            sq = zf.square().sum(dim=1, keepdim=True) + 1  # ||z||^2 + ||c_k||^2
            if torch.is_grad_enabled() and (zf.requires_grad or c.requires_grad):
                d = (sq - 2 * a).clamp_min(1e-12).sqrt()
                return torch.relu(d.mean(dim=1, keepdim=True) - d)
            # No graph to keep: in place on the one (N, K, H, W) tensor, a fraction of the memory
            # traffic (a frozen layer encoding a dataset, as the probe does, is bound by it).
            d = a.mul_(-2).add_(sq).clamp_min_(1e-12).sqrt_()
            mean = d.mean(dim=1, keepdim=True)
            return d.neg_().add_(mean).relu_()


class SingleLayerNet(nn.Module):
    """``conv(k x k, stride 1, no padding) -> BN -> ReLU -> 2 x 2 average pool -> linear``.

    ``filters`` (default 1,600, Coates et al.'s largest dictionary) is multiplied by ``width``
    (rounded, at least 1); ``kernel`` is the receptive field (6 in the paper). ``batch_norm=False``
    gives the conv a bias instead of the BN layer; ``patch_norm=True`` makes the conv a
    :class:`PatchNormConv2d` (each patch contrast-normalized first, as Coates et al. encode).
    ``encoder="triangle"``: Coates et al.'s encoder instead of conv, BN and ReLU,
    ``PatchWhitening -> TriangleConv2d`` (no BN; ``batch_norm`` and ``patch_norm`` stay at their
    defaults), then the same pooling and classifier.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, *, filters: int = 1600,
                 kernel: int = 6, pool: int = 2, batch_norm: bool = True, patch_norm: bool = False,
                 encoder: str = "relu", device=None, dtype=None) -> None:
        super().__init__()
        if width <= 0 or filters < 1 or kernel < 1 or pool < 1:
            raise ValueError(f"width must be > 0 and filters, kernel, pool >= 1, got {width}, {filters}, {kernel}, {pool}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        if encoder not in ("relu", "triangle"):
            raise ValueError(f"encoder must be 'relu' or 'triangle', got {encoder!r}")
        if encoder == "triangle" and (not batch_norm or patch_norm):
            raise ValueError("encoder='triangle' has no BN layer and normalizes every patch itself: "
                             "leave batch_norm and patch_norm at their defaults")
        kw = dict(device=device, dtype=dtype)
        k = max(1, round(filters * width))
        if encoder == "triangle":
            white = PatchWhitening(in_channels, kernel, **kw)
            encode = [white, TriangleConv2d(white.out_channels, k, **kw)]
        else:
            conv = PatchNormConv2d if patch_norm else nn.Conv2d
            encode = [conv(in_channels, k, kernel, bias=not batch_norm, **kw),
                      *([nn.BatchNorm2d(k, **kw)] if batch_norm else []), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *encode,
            nn.AdaptiveAvgPool2d(pool),  # quadrant pooling (Coates et al. sum; a mean is the same up to scale)
            nn.Flatten(),
        )
        self.classifier = nn.Linear(k * pool * pool, num_classes, **kw)
        # batch_norm: whether the net has BN layers (the triangle encoder has none).
        self.num_classes, self.width, self.patch_norm, self.encoder = num_classes, width, patch_norm, encoder
        self.batch_norm = batch_norm and encoder == "relu"

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def coates(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, device=None, dtype=None,
           batch_norm: bool = True, patch_norm: bool = False) -> SingleLayerNet:
    """Coates et al.'s single-layer net: 1,600 x ``width`` filters of 6 x 6, quadrant pooling."""
    return SingleLayerNet(num_classes, width, in_channels, batch_norm=batch_norm, patch_norm=patch_norm,
                          device=device, dtype=dtype)


def coates_triangle(num_classes: int = 10, width: float = 1.0, in_channels: int = 3, device=None,
                    dtype=None) -> SingleLayerNet:
    """The same net with Coates et al.'s encoder: whitened patches, the triangle code of 1,600 x
    ``width`` centroids (:class:`TriangleConv2d`), quadrant pooling. Its :class:`PatchWhitening` must
    be fitted (:func:`fit_whitening_`) before it is used or initialized."""
    return SingleLayerNet(num_classes, width, in_channels, encoder="triangle", device=device, dtype=dtype)
