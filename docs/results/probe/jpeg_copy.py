"""A CIFAR-10 copy with one more JPEG loss, to ask how much our copy's own JPEG loss may cost.

This project's CIFAR-10 (../shared/data/README.md) was decoded from quality-75 JPEGs: about 5.8 grey
levels mean absolute error against the original pixels (PSNR about 30 dB). We cannot undo that loss,
but we can add a second one of the same size and measure what it costs a probe. Re-encoding at the
same quality on the same 8x8 block grid is nearly lossless (0.19 grey levels: the quantized
coefficients come back as they were), so each image is shifted by ``--shift`` pixels (circularly),
encoded at ``--quality`` with PIL's defaults (4:2:0 chroma), decoded and shifted back: the blocks now
straddle the first encoding's, and the new loss is about as large as the first (quality 75, shift 4:
5.5 grey levels, 30.8 dB on 500 training images). Training and test images both get it, as both
got the first.

    python docs/results/probe/jpeg_copy.py --out runs/cifar-jpeg2   # writes runs/cifar-jpeg2/cifar-10-batches-py
    kmeansinit probe --model coates-triangle --init kmeans-layerwise --data runs/cifar-jpeg2 --out ...

Not a library module: a reference for docs/results/probe/README.md, kept beside its numbers.
"""
from __future__ import annotations

import argparse
import io
import pickle
import sys
from pathlib import Path

import numpy as np

from kmeansinit.data import CIFAR_SOURCES

SRC = CIFAR_SOURCES["cifar10"]  # the official layout's folder and file names


def recompress(images: np.ndarray, quality: int, shift: int) -> np.ndarray:
    """``images`` (N, 3072) uint8 in CIFAR's CHW order, each shifted, JPEG-coded and shifted back."""
    from PIL import Image

    hwc = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    out = np.empty_like(hwc)
    for i, img in enumerate(hwc):
        buf = io.BytesIO()
        Image.fromarray(np.roll(img, (shift, shift), (0, 1))).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.roll(np.asarray(Image.open(buf).convert("RGB")), (-shift, -shift), (0, 1))
    return out.transpose(0, 3, 1, 2).reshape(images.shape[0], -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data", help="folder holding cifar-10-batches-py")
    ap.add_argument("--out", required=True, help="folder to write cifar-10-batches-py into")
    ap.add_argument("--quality", type=int, default=75)
    ap.add_argument("--shift", type=int, default=4, help="pixels each image is shifted before coding")
    args = ap.parse_args(argv)
    src, dst = Path(args.data) / SRC["folder"], Path(args.out) / SRC["folder"]
    if not (src / SRC["meta"]).is_file():
        sys.exit(f"error: --data {args.data}: no {SRC['folder']}/{SRC['meta']} there")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / SRC["meta"]).write_bytes((src / SRC["meta"]).read_bytes())
    errs = []
    for name in SRC["train"] + SRC["test"]:
        with open(src / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        new = recompress(d["data"], args.quality, args.shift)
        e = new.astype(np.float64) - d["data"]
        errs.append((np.abs(e).sum(), np.square(e).sum(), e.size))
        d["data"] = new
        with open(dst / name, "wb") as f:
            pickle.dump(d, f, protocol=4)
    a, s, n = map(sum, zip(*errs))
    print(f"wrote {dst}: quality {args.quality}, shift {args.shift}; against --data: mean absolute error "
          f"{a / n:.2f} grey levels, PSNR {10 * np.log10(255 ** 2 * n / s):.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
