"""Init cost against training: seconds of an init on 256 images as a fraction of one training epoch.

One epoch is 390 SGD steps at batch 128 (CIFAR-10's 50,000 images), timed here over ``--steps``
steps and scaled by 390 / steps (the step cost is constant after warm-up), in the same process and
on the same threads as the init, alternately, so drift hits both alike. Images are CIFAR-shaped
uniform noise unless ``--data`` names a CIFAR-10 folder (the first 256 training images, normalized).
Each init runs on a fresh model built with the same seed. With ``--profile``, where the init's time
goes (cProfile, the k-means init's own phases: ZCA statistics, Lloyd passes, report objectives).

    python benchmarks/init_cost.py [--models paper,resnet20,mobilenetv2] [--inits kmeans,lsuv] [--steps 20]
        [--variant fast:kmeans-he-norm:stat_patches=16384,steps=5] [--variant few:kmeans-he-norm:images=64]

A variant's ``images=N`` is not an init option: that row's init sees the first N of the images.
Nor is ``gram="full"``: that row's ZCA statistics take the whole Gram product ``p^T p`` of every
block of patch rows, as before the upper-triangle blocks of ``whiten.add_upper_gram_`` (the baseline
of that change, timed in the same process; the table's notes say whether its weights equal the
row of the same init without it):

    python benchmarks/init_cost.py --models paper,resnet20 --inits kmeans-variance --variant 'full Gram:kmeans-variance:gram="full"'
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from _common import append_results, pick_device

from kmeansinit import create_model, initialize_

EPOCH_STEPS = 390  # 50,000 / 128


def images_for(a, dev) -> torch.Tensor:
    if a.data:
        from kmeansinit.data import Normalizer, load_dataset

        ds = load_dataset("cifar10", a.data)
        return Normalizer.fit(ds.train_x)(ds.train_x[:a.images]).to(dev)
    g = torch.Generator().manual_seed(0)
    return (torch.rand(a.images, 3, 32, 32, generator=g) * 2 - 1).to(dev)


def step_seconds(model, dev, steps: int) -> float:
    """Median seconds of one SGD step (batch 128, momentum 0.9) after 3 warm-up steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 3, 32, 32, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (128,), generator=g).to(dev)
    model.train()
    times = []
    for i in range(3 + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[3:])
    return times[len(times) // 2]


@contextlib.contextmanager
def full_gram():
    """The ZCA statistics with the whole product ``p^T p`` per block of rows (the path before
    ``add_upper_gram_``): the baseline of that change."""
    from kmeansinit.init import whiten

    def add_full(out, p, block=None):
        out += p.t() @ p
        return out

    saved = whiten.add_upper_gram_, whiten.symmetrize_upper_
    whiten.add_upper_gram_, whiten.symmetrize_upper_ = add_full, lambda m: m
    try:
        yield
    finally:
        whiten.add_upper_gram_, whiten.symmetrize_upper_ = saved


def init_seconds(name: str, init: str, images, dev, options=None, width: float = 1.0, gram: str | None = None):
    """Seconds of one init on a fresh model, its report, and the model's conv and linear weights."""
    torch.manual_seed(0)
    m = create_model(name, width=width).to(dev).to(memory_format=torch.channels_last)
    with full_gram() if gram == "full" else contextlib.nullcontext():
        t = time.perf_counter()
        rep = initialize_(m, init, images, progress=False, **(options or {}))
        s = time.perf_counter() - t
    return s, rep, {k: v.detach().clone() for k, v in m.state_dict().items() if k.endswith("weight")}


def parse_variant(text: str) -> tuple[str, str, dict]:
    import json

    label, init, opts = (text.split(":") + [""])[:3]
    options = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in opts.split(",") if kv)}
    return label, init, options


def profile_init(name: str, init: str, images, dev, rows: int = 12, options=None, label=None, width: float = 1.0) -> list[str]:
    torch.manual_seed(0)
    m = create_model(name, width=width).to(dev).to(memory_format=torch.channels_last)
    pr = cProfile.Profile()
    pr.enable()
    initialize_(m, init, images, progress=False, **(options or {}))
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    total = max(st.total_tt, 1e-9)
    # Cumulative time of the init's own functions (kmeansinit modules), the largest first.
    own = [(v[3], f"{k[0].split('kmeansinit/')[-1]}:{k[2]}") for k, v in st.stats.items() if "kmeansinit/" in k[0]]
    own.sort(reverse=True)
    out = [f"Profile: {label or init} on {name}, {images.shape[0]} images (cProfile, cumulative seconds of the init's own functions)", "",
           "| function | seconds | share of the init |", "|---|---|---|"]
    for cum, label in own[1:rows + 1]:  # [0] is initialize_ itself
        out.append(f"| {label} | {cum:.2f} | {100 * cum / total:.0f}% |")
    return out + [""]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="paper,resnet20,mobilenetv2")
    p.add_argument("--inits", default="kmeans,kmeans-he-norm,lsuv")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of every model")
    p.add_argument("--steps", type=int, default=20, help="training steps timed per model")
    p.add_argument("--repeats", type=int, default=2, help="timed inits per (model, init); the median is kept")
    p.add_argument("--data", default=None, help="a folder holding cifar-10-batches-py (default: noise images)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:INIT:K=V,K=V",
                   help="an extra row: INIT with these options (JSON values), labelled NAME, e.g. "
                        "fast:kmeans-he-norm:stat_patches=16384,steps=5")
    a = p.parse_args()
    dev = pick_device(a.device)
    images = images_for(a, dev)
    lines = [f"One epoch = {EPOCH_STEPS} SGD steps at batch 128 (median step over {a.steps} timed steps x {EPOCH_STEPS}); "
             f"init on {a.images} {'CIFAR-10 training' if a.data else 'uniform-noise'} images, median of {a.repeats}.", "",
             "| model | init | init seconds | epoch seconds | init / epoch | layers skipped |", "|---|---|---|---|---|---|"]
    profiles, notes, weights = [], [], {}
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = create_model(name, width=a.width).to(dev).to(memory_format=torch.channels_last)
        rows = [(init, init, {}) for init in a.inits.split(",")] + [parse_variant(v) for v in a.variant]
        for label, init, options in rows:
            options = dict(options)
            seen = images[:options.pop("images")] if "images" in options else images
            gram = options.pop("gram", None)
            if gram not in (None, "full"):
                raise SystemExit(f"--variant {label}: gram must be \"full\", got {gram!r}")
            inits, steps = [], []
            for _ in range(a.repeats):  # alternate init and training steps: drift hits both
                s, rep, w = init_seconds(name, init, seen, dev, options, a.width, gram)
                inits.append(s)
                steps.append(step_seconds(model, dev, a.steps))
            s_init, s_step = sorted(inits)[len(inits) // 2], sorted(steps)[len(steps) // 2]
            epoch = s_step * EPOCH_STEPS
            skipped = len(getattr(rep, "skipped", None) or {})
            shown = init if label == init else f"{label}: {init} {options}" + \
                (f", {seen.shape[0]} images" if seen.shape[0] != images.shape[0] else "")
            shown_name = name if a.width == 1.0 else f"{name} (width {a.width:g})"
            lines.append(f"| {shown_name} | {shown} | {s_init:.2f} | {epoch:.1f} | {s_init / epoch:.3f} | {skipped} |")
            print(lines[-1], flush=True)
            key = (name, init, repr(sorted(options.items())), seen.shape[0])
            if gram is None:
                weights[key] = w
            elif key in weights:
                same = all(torch.equal(w[k], weights[key][k]) for k in w)
                notes.append(f"- {name}, {label}: weights {'equal, bit for bit, to' if same else 'differ from'} "
                             f"those of the {init} row above.")
                print(notes[-1], flush=True)
            if a.profile and init.startswith("kmeans"):
                with full_gram() if gram == "full" else contextlib.nullcontext():
                    profiles += profile_init(name, init, seen, dev, options=options, label=label, width=a.width)
    notes = notes + [""] if notes else []
    append_results(f"Init cost against one training epoch ({dev.type}, {a.images} images)", dev,
                   lines + [""] + notes + profiles)


if __name__ == "__main__":
    main()
