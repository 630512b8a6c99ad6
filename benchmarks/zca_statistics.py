"""The ZCA statistics of each layer (ZCASpace's one pass: patch covariance, then its whitening): the
Gram matrix by upper-triangle block rows (``whiten.add_upper_gram_``) against the whole product
``p^T p`` per block of rows (the path before it), timed alternately in one process.

Each layer's inputs are those of a He-initialized net in train mode (BN on batch statistics) on the
first 256 CIFAR-10 training images (``--data``; else uniform noise), in chunks of 64 as the k-means
init takes them; the statistics' cost depends on the inputs' shapes, not their values. The share
columns say how much of the blocked path's time is the Gram products and the eigendecomposition.

    python benchmarks/zca_statistics.py [--models paper,resnet20] [--threads 1] [--repeats 5] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from _common import append_results, timed_many

from kmeansinit import create_model
from kmeansinit.init import whiten
from kmeansinit.init.baselines import he_
from init_cost import full_gram, images_for


def layer_inputs(model: nn.Module, images: torch.Tensor, chunk: int = 64) -> dict[str, list[torch.Tensor]]:
    """Every ungrouped Conv2d's inputs, chunk by chunk, from one train-mode pass per chunk."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    seen: dict[str, list] = {n: [] for n in convs}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone())) for n, m in convs.items()]
    model.train()
    with torch.no_grad():
        for x in images.split(chunk):
            model(x)
    for h in hooks:
        h.remove()
    return {n: seen[n] for n in convs}


def parts(layer, chunks) -> tuple[float, float]:
    """Seconds of the Gram products and of the eigendecomposition in one blocked ZCASpace."""
    spent = {"gram": 0.0, "eigh": 0.0}
    add, eigh = whiten.add_upper_gram_, torch.linalg.eigh

    def timed_add(out, p, block=None):
        t = time.perf_counter()
        add(out, p, block)
        spent["gram"] += time.perf_counter() - t
        return out

    def timed_eigh(a):
        t = time.perf_counter()
        r = eigh(a)
        spent["eigh"] += time.perf_counter() - t
        return r

    whiten.add_upper_gram_, torch.linalg.eigh = timed_add, timed_eigh
    try:
        whiten.ZCASpace(layer, chunks)
    finally:
        whiten.add_upper_gram_, torch.linalg.eigh = add, eigh
    return spent["gram"], spent["eigh"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="paper,resnet20")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--data", default=None, help="a folder holding cifar-10-batches-py (default: noise images)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    images = images_for(a, dev)
    lines = [f"ZCA statistics per layer (ZCASpace: covariance of every patch, then eigh), {a.images} "
             f"{'CIFAR-10 training' if a.data else 'uniform-noise'} images in chunks of 64; median of {a.repeats}, "
             "the two paths alternately.", "",
             "| model | layer | patch dim | patches | full product s | blocked s | full / blocked | Gram share (blocked) | eigh share (blocked) | W equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    totals = {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = create_model(name)
        he_(model)
        tf = tb = 0.0
        for lname, chunks in layer_inputs(model, images).items():
            layer = dict(model.named_modules())[lname]
            dim, rows = layer.weight[0].numel(), sum(whiten.patch_count(x, layer) for x in chunks)

            def blocked():
                return whiten.ZCASpace(layer, chunks)

            def full():
                with full_gram():
                    return whiten.ZCASpace(layer, chunks)

            s_full, s_blocked = timed_many([full, blocked], a.repeats, dev, warmup=1)
            gram, eig = parts(layer, chunks)
            same = torch.equal(full().W, blocked().W)
            tf, tb = tf + s_full, tb + s_blocked
            lines.append(f"| {name} | {lname} | {dim} | {rows:,} | {s_full:.3f} | {s_blocked:.3f} | {s_full / s_blocked:.2f}x "
                         f"| {100 * gram / max(s_blocked, 1e-9):.0f}% | {100 * eig / max(s_blocked, 1e-9):.0f}% | {'yes' if same else 'no'} |")
            print(lines[-1], flush=True)
        totals[name] = (tf, tb)
    lines.append("")
    for name, (tf, tb) in totals.items():
        lines.append(f"{name}: every layer's statistics {tf:.2f} s with the full product, {tb:.2f} s blocked: {tf / tb:.2f}x")
        lines.append("")
    append_results(f"ZCA statistics, full Gram product vs upper-triangle blocks (cpu, {a.images} images)", dev, lines)


if __name__ == "__main__":
    main()
