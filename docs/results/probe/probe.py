"""Linear probe of a one-layer feature extractor set by each init (Coates & Ng 2011's setting).

Coates & Ng (AISTATS 2011) report about 78-79% on CIFAR-10 from k-means filters on whitened 6x6
patches, a rectifying encoder and 2x2 sum pooling, with a linear classifier on top: the filters
come from unlabelled images only. Here the filters come from ``initialize_`` (the library as a user
calls it) and nothing but the linear classifier is trained, so the probe measures what an init's
first layer knows before any gradient step, with all labels and with few (2,000):

    features(x) = avgpool_2x2( relu( standardize( conv_{K filters, 6x6}(x) ) ) )     # 4K values

``standardize`` is a per-filter mean and variance (a BN layer without affine, its statistics
averaged over 10,000 training images and fixed before the probe), so an init's filter norms do not
matter, only its directions. The classifier: multinomial logistic regression on the standardized features, an L2
weight chosen on the validation split (the fair grid's 5,000 held-out images), fitted by L-BFGS.

    python docs/results/probe/probe.py [--filters 1600] [--inits he,kmeans,kmeans-layerwise] [--seeds 0]

An init may carry options after ``@``, as ``kmeansinit train --init-option`` takes them:
``--inits 'kmeans@zca_eps=1.0'`` (several: ``kmeans@zca_eps=0.1@steps=20``). Inits are separated by
commas, so an option value cannot hold one.

Appends one JSON line per (init, seed, labels) to docs/results/probe/results.jsonl (a row already
there is not run again) and prints a table. ``whitening`` (airbench's init) has at most one filter
pair per patch dimension (108 for 6x6x3), so it runs only where ``--filters`` is at most 216.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kmeansinit import initialize_
from kmeansinit.cli import _option
from kmeansinit.data import Normalizer, load_cifar
from kmeansinit.train import labelled_subset, split_validation

HERE = Path(__file__).resolve().parent
L2 = (1e-5, 1e-4, 1e-3, 1e-2)


class OneLayer(nn.Module):
    """conv (no bias) -> BN without affine -> ReLU: the net the init sees (k-means clusters the conv's input)."""

    def __init__(self, filters: int, kernel: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, filters, kernel, bias=False)
        self.bn = nn.BatchNorm2d(filters, affine=False, momentum=None)  # momentum None: a plain average

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def features(self, x):
        return F.adaptive_avg_pool2d(self(x), 2).flatten(1)


@torch.no_grad()
def extract(model: OneLayer, x_uint8, norm: Normalizer, batch: int = 250) -> torch.Tensor:
    return torch.cat([model.features(norm(x)) for x in x_uint8.split(batch)])


@torch.no_grad()
def fit_bn(model: OneLayer, x_uint8, norm: Normalizer, batch: int = 250):
    model.train()
    model.bn.reset_running_stats()
    for x in x_uint8.split(batch):
        model(norm(x))
    model.eval()


def probe(train_f, train_y, val_f, val_y, test_f, test_y, classes: int = 10, iters: int = 150):
    """(chosen L2 weight, val acc, test acc, {l2: val acc}) of logistic regression on standardized features."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    z = [(f - mean) / std for f in (train_f, val_f, test_f)]
    per = {}
    best = None
    for l2 in L2:
        w = torch.zeros(z[0].shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z[0] @ w + b, train_y) + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = [((f @ w + b).argmax(1) == y).float().mean().item() * 100 for f, y in ((z[1], val_y), (z[2], test_y))]
        per[l2] = acc[0]
        if best is None or acc[0] > best[1]:
            best = (l2, acc[0], acc[1])
    return (*best, per)


def parse_init(spec: str) -> tuple[str, dict]:
    """``"kmeans@zca_eps=1.0"`` -> ``("kmeans", {"zca_eps": 1.0})``; a value is JSON where it parses."""
    name, *opts = spec.split("@")
    out = {}
    for o in opts:
        if not o.partition("=")[0] or "=" not in o:
            raise ValueError(f"init option {o!r} in {spec!r} is not KEY=VALUE")
        key, value = _option(o)  # the parser of `kmeansinit train --init-option`
        out[key] = value
    return name, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--filters", type=int, default=1600)
    p.add_argument("--inits", default="he,kmeans,kmeans-layerwise")
    p.add_argument("--seeds", default="0")
    p.add_argument("--labels", default="all,2000", help="comma list: 'all' and/or labelled-image counts")
    p.add_argument("--init-images", type=int, default=256)
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    a = p.parse_args(argv)
    try:
        ds = split_validation(load_cifar(a.data), 5000)
    except (OSError, ValueError) as e:
        sys.exit(f"probe.py: cannot load CIFAR-10 from --data {a.data!r}: {e}")
    norm = Normalizer.fit(ds.train_x)
    out = Path(a.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["init"], r["seed"], r["labels"], r["filters"]))
    labels = [x if x == "all" else int(x) for x in a.labels.split(",")]
    specs = a.inits.split(",")
    try:
        parsed = {spec: parse_init(spec) for spec in specs}
    except ValueError as e:
        sys.exit(f"probe.py: --inits: {e}")
    for init in specs:
        name, extra = parsed[init]
        for seed in (int(s) for s in a.seeds.split(",")):
            todo = [n for n in labels if (init, seed, n, a.filters) not in done]
            if not todo:
                continue
            torch.manual_seed(seed)
            model = OneLayer(a.filters)
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(ds.train_y), generator=g)[:a.init_images]
            images = norm(ds.train_x[idx])
            t0 = time.perf_counter()
            opts = dict(seed=seed) if name.startswith("kmeans") else dict(generator=torch.Generator().manual_seed(seed))
            initialize_(model, name, None if name in ("he", "xavier") else images, **opts, **extra)
            init_s = time.perf_counter() - t0
            fit_bn(model, ds.train_x[:10_000], norm)  # per-filter statistics over 10,000 unlabelled training images
            t0 = time.perf_counter()
            tr, va, te = (extract(model, x, norm) for x in (ds.train_x, ds.val_x, ds.test_x))
            feat_s = time.perf_counter() - t0
            for n in todo:
                if n == "all":
                    f, y = tr, ds.train_y
                else:  # the labelled subset's rows of the extracted features
                    keep = _rows(ds, n)
                    f, y = tr[keep], ds.train_y[keep]
                l2, val, test, per = probe(f, y, va, ds.val_y, te, ds.test_y)
                row = dict(init=init, seed=seed, labels=n, filters=a.filters, l2=l2, val_acc=round(val, 2),
                           test_acc=round(test, 2), val_by_l2={str(k): round(v, 2) for k, v in per.items()},
                           init_seconds=round(init_s, 1), feature_seconds=round(feat_s, 1),
                           init_images=a.init_images)
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{init} seed {seed} labels {n}: val {val:.1f} test {test:.1f} (l2 {l2:g})", flush=True)
    table(out)


def _rows(ds, n: int) -> torch.Tensor:
    """Indices into ``ds.train_x`` of the ``n`` images ``labelled_subset`` keeps (run on the indices themselves)."""
    return labelled_subset(dataclasses.replace(ds, train_x=torch.arange(len(ds.train_y))), n).train_x


def table(path: Path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    print("| filters | init | labels | seed | val acc % | test acc % | L2 | init s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["filters"], str(r["labels"]), -r["val_acc"])):
        print(f"| {r['filters']} | {r['init']} | {r['labels']} | {r['seed']} | {r['val_acc']:.1f} | "
              f"{r['test_acc']:.1f} | {r['l2']:g} | {r['init_seconds']:.1f} |")


if __name__ == "__main__":
    main()
