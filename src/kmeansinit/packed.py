"""A compact copy of an in-memory dataset, for a machine the full files cannot travel to.

CIFAR-10's python batches are 177 MB; a device session here carries at most 64 MiB of working tree.
:func:`pack_dataset` stores each image as a baseline JPEG (Pillow, 4:2:0) *without* its headers:
every image of one quality shares the same 609-byte header (quantization and standard Huffman
tables), so it is kept once and each image keeps only its scan, about 330 bytes for a 32 x 32 CIFAR
image: 18.8 MiB for all 60,000 of CIFAR-10. Labels, class names and the dataset's name travel as they are.

It is lossy. On this project's CIFAR-10 copy, itself decoded from quality-75 JPEGs, quality 75
re-encodes almost exactly: a mean absolute error of 0.155 grey levels (train; test 0.157) against
the copy (``kmeansinit pack --out shared/cifar10.npz``, 43 s here), which itself differs from the
official pixels by 5.8. :func:`pack_dataset` measures the error it makes and
stores it in the pack; ``kmeansinit pack`` prints it. Runs on a pack compare with runs on the source
only up to that error.

:func:`load_packed` returns a :class:`~kmeansinit.data.Dataset`'s fields, which
``data.load_dataset`` wraps; ``--data PACK.npz`` reads a pack wherever a dataset folder is accepted.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["pack_dataset", "load_packed", "is_pack", "PackError"]


class PackError(ValueError):
    """A pack that cannot be written or read; the message names the file and what is wrong.
    (``data.load_dataset`` raises it again as a ``DataError``; ``data.py`` imports this module, not the
    other way round.)"""

_SOS = b"\xff\xda"  # start of scan: everything before it is the shared header
_FORMAT = "kmeansinit-jpeg-pack-1"


def _image_module():
    try:
        from PIL import Image
    except ImportError as e:  # pillow is a dependency; a stripped environment says so in one line
        raise ImportError("packing images needs Pillow: pip install pillow") from e
    return Image


def _encode(x: Tensor, quality: int, where: str, progress: bool = False) -> tuple[bytes, list[bytes]]:
    """The shared header and each image's scan, for uint8 images ``(N, 3, H, W)``."""
    from tqdm import tqdm

    Image = _image_module()
    arr = x.permute(0, 2, 3, 1).contiguous().numpy()
    header, scans = None, []
    for i, im in enumerate(tqdm(arr, desc=f"pack {where}", unit="img", disable=not progress, mininterval=1.0)):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality, subsampling=2)
        blob = buf.getvalue()
        cut = blob.index(_SOS)
        if header is None:
            header = blob[:cut]
        elif blob[:cut] != header:  # one height and width, one quality: Pillow writes one header
            raise PackError(f"{where}: image {i} has a JPEG header unlike the first one (mixed image sizes?)")
        scans.append(blob[cut:])
    return header, scans


def _decode(header: bytes, scans: np.ndarray, offsets: np.ndarray, shape) -> Tensor:
    Image = _image_module()
    n, c, h, w = shape
    out = np.empty((n, h, w, c), dtype=np.uint8)
    raw = scans.tobytes()
    for i in range(n):
        im = Image.open(io.BytesIO(header + raw[offsets[i]:offsets[i + 1]]))
        out[i] = np.asarray(im.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def pack_dataset(ds, out: str | os.PathLike, *, quality: int = 75, label: str | None = None,
                 progress: bool = False) -> dict:
    """Write ``ds`` (a :class:`~kmeansinit.data.Dataset`: RGB uint8 images) to the pack ``out``
    (``.npz``); returns its summary: the size in bytes and the mean / max absolute pixel error of the
    round trip, per split."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: a pack is an .npz file; name it *.npz")
    arrays, summary = {}, {"format": _FORMAT, "name": ds.name, "label": label, "quality": quality}
    header = None
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            raise PackError(f"{split} images: expected uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        head, scans = _encode(x, quality, f"{ds.name} {split}", progress)
        if header is not None and head != header:
            raise PackError(f"{ds.name}: train and test images differ in size; a pack holds one size")
        header = head
        lengths = np.array([len(s) for s in scans], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.frombuffer(b"".join(scans), dtype=np.uint8)
        back = _decode(header, flat, offsets, tuple(x.shape))
        err = (back.int() - x.int()).abs()
        summary[f"{split}_images"] = int(x.shape[0])
        summary[f"{split}_mean_abs_error"] = float(err.float().mean()) if err.numel() else 0.0
        summary[f"{split}_max_abs_error"] = int(err.max()) if err.numel() else 0
        arrays.update({f"{split}_scans": flat, f"{split}_offsets": offsets, f"{split}_labels": y.numpy().astype(np.int64),
                       f"{split}_shape": np.array(x.shape, dtype=np.int64)})
    arrays["header"] = np.frombuffer(header, dtype=np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps({**summary, "classes": list(ds.classes)}).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a str path
        np.savez(f, **arrays)
    tmp.replace(out)
    summary["bytes"] = out.stat().st_size
    return summary


def is_pack(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix == ".npz" and p.is_file()


def _cache_path(path: Path) -> Path:
    """Where the decoded pack is kept: outside the repository (a cache in ``shared/`` would travel to
    the device with the pack and break its 64 MiB limit), keyed by the pack's path, size and mtime."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("KMEANSINIT_PACK_CACHE") or Path(tempfile.gettempdir()) / "kmeansinit-packs")
    return root / f"{path.stem}-{key}.pt"


def load_packed(path: str | os.PathLike, name: str | None = None, label: str | None = None, *,
                cache: bool = True) -> dict:
    """The pack at ``path`` as the fields of a :class:`~kmeansinit.data.Dataset` (``train_x``,
    ``train_y``, ``test_x``, ``test_y``, ``classes``, ``name``); ``name`` / ``label``, when given,
    must be the pack's (a CIFAR-100 pack holds the labels it was packed with).

    Decoding CIFAR-10's 60,000 JPEGs takes seconds; with ``cache`` the decoded tensors are kept in
    ``$KMEANSINIT_PACK_CACHE`` (default: the temp folder's ``kmeansinit-packs/``) and the next run
    (a grid's other cells) reads them instead, tensors only (``weights_only``). A cache file that
    cannot be read is decoded again and rewritten."""
    path = Path(path)
    out = None
    if cache and path.is_file():
        where = _cache_path(path)
        if where.is_file():
            try:
                out = torch.load(where, weights_only=True)
                meta = out.pop("meta")
            except Exception:  # a torn or foreign file: decode again
                out = None
    if out is None:
        out, meta = _decode_pack(path)
        if cache:
            try:
                where = _cache_path(path)
                where.parent.mkdir(parents=True, exist_ok=True)
                tmp = where.with_name(f"{where.name}.{os.getpid()}.tmp")
                torch.save({**out, "meta": meta}, tmp)
                tmp.replace(where)
            except OSError:  # a full or read-only temp folder: no cache, same result
                pass
    if name is not None and meta["name"] and name != meta["name"]:
        raise PackError(f"{path}: the pack holds {meta['name']}, not {name}")
    if label is not None and meta.get("label") not in (None, label):
        raise PackError(f"{path}: the pack holds the {meta['label']} labels, not {label}")
    return out


def _decode_pack(path: Path) -> tuple[dict, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != _FORMAT:
                raise PackError(f"{path}: not a kmeansinit pack (format {meta.get('format')!r})")
            header = z["header"].tobytes()
            parts = {}
            for split in ("train", "test"):
                shape = tuple(int(v) for v in z[f"{split}_shape"])
                offsets = z[f"{split}_offsets"]
                if offsets.shape != (shape[0] + 1,):
                    raise PackError(f"{path}: {split} offsets do not match its {shape[0]} images")
                x = _decode(header, z[f"{split}_scans"], offsets, shape)
                parts[split] = (x, torch.from_numpy(z[f"{split}_labels"].copy()))
    except PackError:
        raise
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise PackError(f"{path}: unreadable pack ({type(e).__name__}: {e})") from e
    (train_x, train_y), (test_x, test_y) = parts["train"], parts["test"]
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=meta["classes"],
                name=meta["name"]), meta
