"""Does a k-means init win on your net? ``kmeansinit.compare.compare_inits`` with a training loop of
your own: here a plain SGD loop over a zoo net on CIFAR-10, the kind of code a user already has.
Swap in your model for ``build`` and your loop for ``fit``; the comparison stays the same.

    python examples/compare_inits.py --data ../shared/data --model resnet20 --steps 390 \\
        --lrs 0.05 0.1 0.2 --seeds 2 --path runs/compare_resnet20.json

Each init (He, LSUV, ``kmeans-variance`` with ``zca_eps=1.0`` by default) gets its own best rate on
seed 0, then ``--seeds`` fresh seeds at it; the table sets each against the best baseline. Rerun the
same command to resume from ``--path``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kmeansinit import compare_inits
from kmeansinit.data import BatchLoader, Normalizer, load_cifar
from kmeansinit.models import create_model
from kmeansinit.train import split_validation

INITS = {"he": {}, "lsuv": {}, "kmeans-variance-eps1": {"init": "kmeans-variance", "zca_eps": 1.0}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="folder holding cifar-10-batches-py/")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=390, help="SGD steps per run (390: one epoch at batch 128)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--val", type=int, default=5000, help="training images held out to score each run")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--inits", nargs="+", default=list(INITS), help=f"labels of {list(INITS)} or method names")
    ap.add_argument("--path", default=None, help="JSON file that keeps every finished run (resume: same command)")
    args = ap.parse_args(argv)

    try:  # the validation split every kmeansinit run holds out
        ds = split_validation(load_cifar(args.data), args.val)
    except ValueError as e:
        ap.error(f"--val: {e}")
    norm = Normalizer.fit(ds.train_x)
    pick = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(0))[:256]
    images = norm(ds.train_x[pick])  # 256 unlabelled images at random, normalized as training sees them
    xv, yv = norm(ds.val_x), ds.val_y

    def build(seed: int) -> torch.nn.Module:
        return create_model(args.model, num_classes=ds.num_classes, width=args.width)

    def fit(model: torch.nn.Module, lr: float, seed: int) -> float:
        torch.manual_seed(seed)
        loader = BatchLoader(ds.train_x, ds.train_y, min(args.batch, len(ds.train_y)), norm, seed=seed, crop=4)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        model.train()
        for step in range(args.steps):
            for group in opt.param_groups:  # cosine decay to zero
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            x, y = loader.batch(step)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                return float("nan")  # diverged: ranks below every finite score
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in zip(xv.split(500), yv.split(500)))
        return correct / len(yv)

    inits = {k: INITS.get(k, {"init": k}) for k in args.inits}
    result = compare_inits(build, fit, images, inits=inits, lrs=args.lrs, seeds=args.seeds, path=args.path)
    print(result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
