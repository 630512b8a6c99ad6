"""What the k-means init clusters: target layers (filters in banks) and their inputs over the images.

A ``_Target`` is one layer with its filters arranged in banks (one per conv group; gated convs
interleaved back to bank-major order); ``_LayerInputs`` gives that layer's inputs chunk by chunk,
kept when small, recomputed otherwise, shared out over ranks under torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import all_reduce_, world
from ..layers import GatedConv2d
from ..objectives import patch_sq_norms
from ._model import Taps

_EPS = 1e-8


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



def _layout(x: Tensor) -> Tensor:
    if x.dim() == 4:
        # Channels innermost: the conv kernels skip a layout reorder and the argmax over
        # filters reads contiguous memory (7x faster on CPU for PaperNet's layers).
        x = x.contiguous(memory_format=torch.channels_last)
    return x


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

    @classmethod
    def given(cls, taps: Taps, images: Tensor, name: str, batch_size: int, cache_bytes: int,
              xs: list[Tensor]) -> "_LayerInputs | None":
        """The inputs ``xs`` of every chunk, computed elsewhere (:class:`~.lockstep.Lockstep`), kept as the
        cache; None when they exceed ``cache_bytes`` (then they are to be streamed). One process only."""
        if world()[1] != 1:
            raise ValueError(f"layer {name}: given inputs are for one process; under torch.distributed each rank computes its own chunks")
        self = cls(taps, images, name, batch_size, cache_bytes)
        if len(xs) != len(self.chunks):
            raise ValueError(f"layer {name}: {len(xs)} given input chunks for {len(self.chunks)} chunks of images")
        if sum(x.numel() * x.element_size() for x in xs) > cache_bytes:
            return None
        self.cache = [(ci, _layout(x)) for ci, x in enumerate(xs)]
        return self

    def _compute(self, chunk: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.taps.run(chunk, stop_at=self.name)[self.name].detach()
        return _layout(x)

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


