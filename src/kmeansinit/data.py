"""Datasets as in-memory uint8 tensors, and a batch loader that augments and normalizes whole batches.

Readers: CIFAR-10 / CIFAR-100 in the official "python version" layout (a folder or the official
``.tar.gz``), optionally downloaded and md5-checked; any image-folder dataset
(``train/<class>/*.png|jpg``, ``test/<class>/*``), decoded once and cached; a compact JPEG pack of
either (:mod:`kmeansinit.packed`), for a machine the full files cannot travel to.

Preprocessing (the paper: "zero-centred and scaled to [-1, 1]"): ``x / 255`` minus the per-channel
mean of the training set, divided per channel by the largest absolute value that channel takes on
the training set. Every channel then has training mean 0 and lies in [-1, 1] on the training set.
"""
from __future__ import annotations

import hashlib
import os
import sys
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .packed import PackError, is_pack, load_packed

__all__ = ["Dataset", "DataError", "load_cifar", "load_image_folder", "load_dataset", "Normalizer", "BatchLoader",
           "flip_batch", "crop_batch", "CIFAR_SOURCES", "download"]


class DataError(ValueError):
    """Bad or missing data; the message names the path and what is wrong."""


@dataclass
class Dataset:
    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CIFAR_SOURCES = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
                    names="label_names"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], meta="meta", names="fine_label_names"),
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name: str, cache: str | os.PathLike, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch the official archive of ``name`` into ``cache`` (once) and check its md5; return its path."""
    src = CIFAR_SOURCES[name]
    url, md5 = url or src["url"], md5 or src["md5"]
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / url.rsplit("/", 1)[-1]
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        try:
            with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except OSError as e:
            raise DataError(f"{url}: download failed ({e})") from e
        tmp.replace(path)
    got = md5sum(path)
    if got != md5:
        raise DataError(f"{path}: md5 {got} does not match the official {md5}; delete it and download again")
    return path


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = pickle.loads(data, encoding="latin1")
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"{where}: corrupt or truncated file ({type(e).__name__}: {str(e).strip()[:80]})") from e
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(d).__name__}")
    return d


def _cifar_arrays(d: dict, where: str, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{where}: missing key {key!r} (has {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels out of range [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def load_cifar(root: str | os.PathLike, name: str = "cifar10", *, label: str = "fine",
               download_to: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10/100 from ``root``: the batches folder, a folder holding it or the archive, or the ``.tar.gz``.

    ``label`` picks CIFAR-100's ``"fine"`` (100) or ``"coarse"`` (20) labels. With ``download_to``,
    a missing dataset is fetched from the official source into that folder and md5-checked.
    """
    if name not in CIFAR_SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(CIFAR_SOURCES)}")
    if label not in ("fine", "coarse"):
        raise DataError(f"label must be 'fine' or 'coarse', got {label!r}")
    src = CIFAR_SOURCES[name]
    root = Path(root)
    archive = src["url"].rsplit("/", 1)[-1]
    candidates = [root if root.name == src["folder"] else root / src["folder"]]
    files = None
    for folder in candidates:
        if folder.is_dir():
            files = {f: folder / f for f in src["train"] + src["test"] + [src["meta"]]}
    tar_path = root if root.is_file() else root / archive
    if files is None and not tar_path.is_file() and download_to is not None:
        tar_path = download(name, download_to)
    if files is None and tar_path.is_file():
        try:
            with tarfile.open(tar_path, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                blobs = {}
                for f in src["train"] + src["test"] + [src["meta"]]:
                    if f not in members:
                        raise DataError(f"{tar_path}: archive has no {src['folder']}/{f}")
                    blobs[f] = tar.extractfile(members[f]).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{tar_path}: corrupt or truncated archive ({e})") from e
        read = lambda f: (blobs[f], f"{tar_path}:{f}")
    elif files is not None:
        def read(f):
            p = files[f]
            if not p.is_file():
                raise DataError(f"{p}: missing file of the {name} layout")
            return p.read_bytes(), str(p)
    else:
        raise DataError(
            f"{root}: no {src['folder']}/ folder or {archive} here; get it with --download "
            f"(or from {src['url']}) and point --data at the folder holding it"
        )
    meta = _unpickle(*read(src["meta"]))
    if name == "cifar100":
        label_key = f"{label}_labels"
        names_key = f"{label}_label_names"
    else:
        label_key, names_key = "labels", src["names"]
    if names_key not in meta:
        raise DataError(f"{read(src['meta'])[1]}: missing key {names_key!r}")
    classes = list(meta[names_key])
    parts = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for f in src[split]:
            blob, where = read(f)
            x, y = _cifar_arrays(_unpickle(blob, where), where, label_key, len(classes))
            xs.append(x)
            ys.append(y)
        parts[split] = (torch.cat(xs), torch.cat(ys))
    return Dataset(*parts["train"], *parts["test"], classes=classes, name=name)


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: str | os.PathLike, *, size: int | None = None, cache: bool = True) -> Dataset:
    """An image-folder dataset ``root/{train,test}/<class>/*``: decoded once to RGB uint8, cached beside it.

    All images must share one size unless ``size`` is given (then each is resized to ``size x size``).
    The cache ``root/.kmeansinit-cache-<size>.pt`` is reused while no image file is newer than it.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (expected {root}/train/<class>/*.png and {root}/test/<class>/*)")
    cache_path = root / f".kmeansinit-cache-{size or 'native'}.pt"
    splits = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d}: missing; an image folder needs train/<class>/ and test/<class>/ sub-folders")
        classes = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{d}: no class folders")
        splits[split] = {c: sorted(p for p in (d / c).iterdir() if p.suffix.lower() in IMAGE_EXTS) for c in classes}
        for c, files in splits[split].items():
            if not files:
                raise DataError(f"{d / c}: empty class folder (no {'/'.join(sorted(IMAGE_EXTS))} files)")
    classes = sorted(splits["train"])
    extra = set(splits["test"]) - set(classes)
    if extra:
        raise DataError(f"{root / 'test'}: classes {sorted(extra)} not in {root / 'train'}")
    newest = max(f.stat().st_mtime for s in splits.values() for fs in s.values() for f in fs)
    if cache and cache_path.is_file() and cache_path.stat().st_mtime >= newest:
        try:  # tensors and plain data only: a planted pickle is refused, and the images decoded again
            return Dataset(**torch.load(cache_path, weights_only=True))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            print(f"kmeansinit: {cache_path}: unusable cache ({first}); decoding the images again", file=sys.stderr)
    out = {}
    shape = None
    for split, by_class in splits.items():
        xs, ys = [], []
        for c, files in by_class.items():
            for f in files:
                try:
                    with Image.open(f) as im:
                        im = im.convert("RGB")
                        if size:
                            im = im.resize((size, size), Image.BILINEAR)
                        a = np.asarray(im, dtype=np.uint8)
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"{f}: cannot decode image ({e})") from e
                if shape is None:
                    shape = a.shape
                elif a.shape != shape:
                    raise DataError(f"{f}: size {a.shape[:2]} differs from {shape[:2]}; pass size=N (--image-size N) to resize")
                xs.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
                ys.append(classes.index(c))
        out[f"{split}_x"] = torch.stack(xs)
        out[f"{split}_y"] = torch.tensor(ys, dtype=torch.int64)
    ds = Dataset(**out, classes=classes, name=root.name)
    if cache:
        tmp = cache_path.with_suffix(".tmp")
        torch.save(dict(out, classes=classes, name=root.name), tmp)
        tmp.replace(cache_path)
    return ds


def load_dataset(name: str, data: str | os.PathLike, *, download: bool = False, label: str = "fine",
                 image_size: int | None = None) -> Dataset:
    """``name`` is ``cifar10``, ``cifar100`` or ``folder`` (an image-folder dataset at ``data``); a
    ``data`` that is an ``.npz`` file is a pack of that dataset (:mod:`kmeansinit.packed`)."""
    if is_pack(data):
        try:
            return Dataset(**load_packed(data, None if name == "folder" else name, None if name == "cifar10" else label))
        except PackError as e:
            raise DataError(str(e)) from e
    if name == "folder":
        return load_image_folder(data, size=image_size)
    return load_cifar(data, name, label=label, download_to=data if download else None)


class Normalizer:
    """Zero-centre each channel on the training set and scale it into [-1, 1] (see module docstring)."""

    def __init__(self, mean: Tensor, scale: Tensor):
        self.mean = mean.reshape(1, -1, 1, 1).float()
        self.scale = scale.reshape(1, -1, 1, 1).float()

    @classmethod
    def fit(cls, x: Tensor, chunk: int = 10_000) -> "Normalizer":
        c = x.shape[1]
        total = torch.zeros(c, dtype=torch.float64)
        for part in x.split(chunk):
            total += part.double().sum(dim=(0, 2, 3))
        mean = total / (x.numel() // c) / 255.0
        lo = x.amin(dim=(0, 2, 3)).double() / 255.0 - mean
        hi = x.amax(dim=(0, 2, 3)).double() / 255.0 - mean
        return cls(mean, torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8))

    def __call__(self, x: Tensor) -> Tensor:
        # The default dtype (float32 unless a caller chose float64, as the stacked-training tests do).
        return (x.to(torch.get_default_dtype()) / 255.0 - self.mean.to(x.device)) / self.scale.to(x.device)

    def state_dict(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "scale": self.scale.flatten().tolist()}


def flip_batch(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror (left-right) the images of ``x`` where ``mask`` is True, in one tensor op."""
    return torch.where(mask.to(x.device).reshape(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def crop_batch(x: Tensor, pad: int, offsets: Tensor) -> Tensor:
    """Random crops of a zero-padded batch: ``offsets`` (N, 2) in [0, 2*pad], one gather per batch."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = offsets.to(x.device)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).reshape(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    padded = padded.gather(2, rows)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).reshape(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(3, cols)


class BatchLoader:
    """Shuffled batches of in-memory uint8 images, augmented and normalized as whole batches.

    Every random choice is a function of ``(seed, epoch)`` for the order and ``(seed, step)`` for
    flips and crops, so the batch of any step is known without replaying earlier ones: resuming at
    step ``k`` gives exactly the batches an uninterrupted run would have had.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, normalizer: Normalizer, *, seed: int = 0,
                 flip: bool = True, crop: int = 0, device: str | torch.device = "cpu", drop_last: bool = True):
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {x.dtype}")
        if batch_size < 1 or batch_size > x.shape[0]:
            raise ValueError(f"batch_size must be in [1, {x.shape[0]}], got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.norm, self.seed = batch_size, normalizer, seed
        self.flip, self.crop, self.device = flip, crop, torch.device(device)
        self.per_epoch = x.shape[0] // batch_size if drop_last else -(-x.shape[0] // batch_size)
        self._perm_epoch, self._perm = None, None

    def _order(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.x.shape[0], generator=g), epoch
        return self._perm

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        x, y = self.x[idx.to(self.x.device)], self.y[idx.to(self.y.device)]
        g = torch.Generator().manual_seed(self.seed * 7_368_787 + step + 1)
        if self.flip:
            x = flip_batch(x, torch.rand(x.shape[0], generator=g) < 0.5)
        if self.crop:
            x = crop_batch(x, self.crop, torch.randint(0, 2 * self.crop + 1, (x.shape[0], 2), generator=g))
        x = x.to(self.device, non_blocking=True)
        return self.norm(x), y.to(self.device, non_blocking=True)
