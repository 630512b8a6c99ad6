"""Coates, Lee & Ng (2011)'s single-layer pipeline, step by step, to find where our probe of
``coates-triangle`` (72.5% test) loses against their 77.9% (1,600 centroids, 6x6, stride 1).

Three commands (twenty-ninth session; one thread each on the 2-core host: about 50 minutes for
``euclid-probe`` and 45 for ``features``, 20 for the logistic ``fit`` and 20 a regularizer for the SVM):

    # 1. their k-means inside our probe: our normalized images, PatchWhitening (eps_norm 0.01) fitted
    #    on 400,000 patches of 8,192 training images, Euclidean k-means (50 iterations, centroids
    #    as found, as their run_kmeans), the triangle code with those centroids, our logistic probe
    python docs/results/probe/coates_reference.py euclid-probe --labels 0 --out runs/coates-ref/euclid-all.json
    # 2. their whole encoder on raw 0-255 pixels (contrast normalization +10, ZCA 0.1, 400,000
    #    random patches of the 45,000 training images, Euclidean k-means, triangle code, quadrant
    #    sums); the features are saved
    python docs/results/probe/coates_reference.py features --eps-norm 10 --out runs/coates-ref/exact.pt
    # 3. a classifier on saved features: our logistic probe (lr) or their L2-SVM (svm)
    python docs/results/probe/coates_reference.py fit runs/coates-ref/exact.pt --classifier lr
    python docs/results/probe/coates_reference.py fit runs/coates-ref/exact.pt --classifier svm --weight-decays 0.1 0.01
    # 4. (thirtieth session) as Coates et al.: all 50,000 training images, the regularizer chosen above
    python docs/results/probe/coates_reference.py fit runs/coates-ref/exact.pt --classifier lr --train-all 0.001
    python docs/results/probe/coates_reference.py fit runs/coates-ref/exact.pt --classifier svm --train-all 0.01

Validation (5,000 held-out training images) chooses every regularizer; the test set is CIFAR-10's.
Not a library module: a reference for docs/results/probe/README.md, kept beside its numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kmeansinit.data import load_dataset
from kmeansinit.models.coates import PatchWhitening, fit_whitening_
from kmeansinit.probe import ProbeConfig, extract_features, fit_linear_probe
from kmeansinit.train import build_model, prepare_data, split_validation

PATCHES, CENTROIDS, ITERATIONS = 400_000, 1600, 50  # Coates et al.'s kmeans_demo settings


def euclidean_kmeans(x: torch.Tensor, k: int, iterations: int, g: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means in Euclidean distance as Coates et al.'s run_kmeans: centroids start as
    N(0, 0.1^2) vectors, each becomes its cluster's mean, an empty cluster's centroid becomes 0."""
    c = torch.randn(k, x.shape[1], generator=g) * 0.1
    for it in range(iterations):
        half_sq = 0.5 * c.square().sum(1)
        sums, counts = torch.zeros_like(c), torch.zeros(k)
        for part in x.split(50_000):
            lab = (part @ c.T - half_sq).argmax(1)  # nearest centroid: max <x, c> - ||c||^2 / 2
            sums.index_add_(0, lab, part)
            counts += torch.bincount(lab, minlength=k).float()
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.zeros_like(c))
        if it % 10 == 9:
            print(f"k-means iteration {it + 1}: {int((counts == 0).sum())} empty, mean centroid norm "
                  f"{float(c.norm(dim=1).mean()):.3f}", flush=True)
    return c


def triangle(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """max(0, mean_j d_j - d_k), d_k = ||z - c_k|| with the centroids as found (no unit norm)."""
    d = (z.square().sum(1, keepdim=True) + c.square().sum(1).reshape(1, -1, 1, 1)
         - 2 * F.conv2d(z, c.reshape(*c.shape, 1, 1))).clamp_min(0).sqrt()
    return (d.mean(1, keepdim=True) - d).relu()


def random_patches(images: torch.Tensor, n: int, g: torch.Generator, size: int = 6) -> torch.Tensor:
    """``n`` patches ``(n, C, size, size)`` at random positions of random images."""
    h = images.shape[-1] - size + 1
    img = torch.randint(len(images), (n,), generator=g)
    r, c = torch.randint(h, (n,), generator=g), torch.randint(h, (n,), generator=g)
    k = torch.arange(size)
    # one gather: (n, size, size) indices broadcast, then the channel slice last -> (n, size, size, C)
    out = images[img[:, None, None], :, (r[:, None] + k)[:, :, None], (c[:, None] + k)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def euclid_probe(a) -> None:
    cfg = ProbeConfig(model="coates-triangle", init="he", labels=a.labels, seed=0)
    tcfg = cfg.train_config()
    ds, pool, norm, _ = prepare_data(tcfg)
    torch.manual_seed(0)
    model = build_model(tcfg, ds.num_classes, ds.train_x.shape[1])
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(pool.train_x), generator=g)[:a.fit_images]
    images = torch.cat([norm(p) for p in pool.train_x[idx].split(1024)])
    t0 = time.time()
    fit_whitening_(model, images, max_patches=PATCHES, seed=0)
    white, tri = model.features[0], model.features[1]
    with torch.no_grad():  # a 6x6 input gives one whitened 108-vector
        x = torch.cat([white(p).flatten(1) for p in random_patches(images, PATCHES, g).split(20_000)])
    c = euclidean_kmeans(x, CENTROIDS, ITERATIONS, g)
    with torch.no_grad():
        tri.weight.copy_(c.reshape(tri.weight.shape))
    tri.forward = lambda z: triangle(z, tri.weight.flatten(1))  # their code: centroids as found
    feats = {}
    for name, xs in (("train", ds.train_x), ("val", ds.val_x), ("test", ds.test_x)):
        feats[name] = extract_features(model, (norm(p) for p in xs.split(500)))
        print(name, tuple(feats[name].shape), f"{time.time() - t0:.0f} s", flush=True)
    fit = fit_linear_probe(feats["train"], ds.train_y, feats["val"], ds.val_y, num_classes=10, log=print)
    _write(a.out, dict(variant="euclid-probe", labels=len(ds.train_y), fit_images=a.fit_images, weight_decay=fit.weight_decay,
                       val_acc=fit.accuracy(feats["val"], ds.val_y), test_acc=fit.accuracy(feats["test"], ds.test_y),
                       train_acc=fit.accuracy(feats["train"], ds.train_y), by_wd=fit.val_accuracy,
                       seconds=time.time() - t0))


def features(a) -> None:
    ds = split_validation(load_dataset("cifar10", a.data), 5000)  # the probe's validation split
    g = torch.Generator().manual_seed(0)
    white = PatchWhitening(3, 6, eps_norm=a.eps_norm, zca_eps=0.1)
    p = random_patches(ds.train_x, PATCHES, g).float()  # raw 0-255 pixels, as their code
    white.fit_(p)  # each 6x6 input is one patch
    with torch.no_grad():
        x = torch.cat([white(part).flatten(1) for part in p.split(20_000)])
    c = euclidean_kmeans(x, CENTROIDS, ITERATIONS, g)

    def encode(images):  # their quadrant sums: rows and columns 0-13 and 14-26 of the 27 x 27 code
        f = triangle(white(images.float()), c)
        return torch.cat([f[:, :, i:j, k:l].sum((2, 3)) for i, j in ((0, 14), (14, 27)) for k, l in ((0, 14), (14, 27))], 1)

    t0, feats = time.time(), {}
    with torch.no_grad():
        for name, xs in (("train", ds.train_x), ("val", ds.val_x), ("test", ds.test_x)):
            feats[name] = torch.cat([encode(part) for part in xs.split(500)])
            print(name, tuple(feats[name].shape), f"{time.time() - t0:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(feats=feats, y=dict(train=ds.train_y, val=ds.val_y, test=ds.test_y), eps_norm=a.eps_norm), a.out)


def fit(a) -> None:
    blob = torch.load(a.features)
    f, y = blob["feats"], blob["y"]
    weight_decays = a.weight_decays
    if a.train_all is not None:  # as Coates et al.: all 50,000 training images, one regularizer chosen before
        f = dict(f, train=torch.cat([f["train"], f["val"]]))
        y = dict(y, train=torch.cat([y["train"], y["val"]]))
        weight_decays = [a.train_all]
    if a.classifier == "lr":  # our probe: standardized features, multinomial logistic regression
        wds = {} if a.train_all is None else dict(weight_decays=weight_decays, extend=0)
        p = fit_linear_probe(f["train"], y["train"], f["val"], y["val"], num_classes=10, log=print, **wds)
        out = dict(classifier="logistic", weight_decay=p.weight_decay, val_acc=p.accuracy(f["val"], y["val"]),
                   test_acc=p.accuracy(f["test"], y["test"]), train_acc=p.accuracy(f["train"], y["train"]),
                   by_wd=p.val_accuracy)
    else:  # their L2-SVM: one-vs-all squared hinge, C * mean(margin^2) + ||theta||^2 / 2, with wd = 1 / C
        mean, sd = f["train"].mean(0), (f["train"].var(0) + 0.01).sqrt()  # their standardization
        z = {k: torch.cat([(v - mean) / sd, torch.ones(len(v), 1)], 1) for k, v in f.items()}
        target = -torch.ones(len(y["train"]), 10)
        target[torch.arange(len(y["train"])), y["train"]] = 1
        theta = torch.zeros(z["train"].shape[1], 10, requires_grad=True)
        res = {}
        for wd in weight_decays:  # their C = 100 is wd = 0.01; warm start from the previous
            opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, history_size=20, tolerance_grad=1e-7,
                                    tolerance_change=1e-10, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                margin = (1 - target * (z["train"] @ theta)).clamp_min(0)
                loss = margin.square().mean(0).sum() + 0.5 * wd * theta.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                res[wd] = {k: float(((z[k] @ theta).argmax(1) == y[k]).float().mean()) for k in z}
            print("l2-svm weight decay", wd, res[wd], flush=True)
        best = max(res, key=lambda w: (res[w]["val"], w))
        out = dict(classifier="l2svm", weight_decay=best, val_acc=res[best]["val"], test_acc=res[best]["test"],
                   train_acc=res[best]["train"], by_wd={f"{k:g}": v["val"] for k, v in res.items()})
    if a.train_all is not None:  # the validation images were trained on: their accuracy is not a validation
        out.update(trained_on="train+val", val_acc=None, by_wd=None)
    _write(a.out or f"{a.features}.{a.classifier}.json", out)


def _write(path, res) -> None:
    print(res)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("euclid-probe")
    e.add_argument("--labels", type=int, default=0)
    e.add_argument("--fit-images", type=int, default=8192)
    e.add_argument("--out", required=True)
    ft = sub.add_parser("features")
    ft.add_argument("--eps-norm", type=float, default=10.0, help="contrast normalization's eps, in squared 0-255 units")
    ft.add_argument("--data", default="../shared/data")
    ft.add_argument("--out", required=True)
    fi = sub.add_parser("fit")
    fi.add_argument("features")
    fi.add_argument("--classifier", choices=("lr", "svm"), default="lr")
    fi.add_argument("--weight-decays", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4],
                    help="the L2-SVM's weights 1/C tried, in this order (each warm-started from the last)")
    fi.add_argument("--train-all", type=float, metavar="WD",
                    help="fit on the training and validation images together (all 50,000, as Coates et al.) "
                         "at this one weight (chosen before on validation) and report test accuracy")
    fi.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"euclid-probe": euclid_probe, "features": features, "fit": fit}[a.cmd](a)


if __name__ == "__main__":
    main()
