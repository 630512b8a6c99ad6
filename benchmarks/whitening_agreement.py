"""Do ZCA and Cholesky whitening give the same k-means init in float32 on real images?

In exact arithmetic they do (one whitened space is a rotation of the other); this prints, per conv
layer, the cosine between the filters the two runs give (same seed, same images), filter by filter
and against the nearest filter of the other run, the ratio of their norms, and both joint objectives. The figures in ``KMeansOptions.whitening``'s docstring come
from ``python benchmarks/whitening_agreement.py --model paper`` (fifth session, 2026-12-01).
"""
from __future__ import annotations

import argparse

import torch

from kmeansinit.data import load_cifar
from kmeansinit.init import initialize_
from kmeansinit.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data", help="folder holding cifar-10-batches-py/")
    ap.add_argument("--model", default="paper")
    ap.add_argument("--init", default="kmeans-variance")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_cifar(args.data)
    pick = torch.randperm(len(ds.train_x), generator=torch.Generator().manual_seed(0))[:args.images]
    x = ds.train_x[pick].float() / 255
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    runs = []
    for whitening in ("zca", "cholesky"):
        torch.manual_seed(0)
        model = create_model(args.model)
        report = initialize_(model, args.init, x, seed=0, progress=False, whitening=whitening)
        runs.append((model.state_dict(), report))
    print(f"{args.model}, {args.init}, {args.images} CIFAR-10 training images, float32: ZCA vs Cholesky whitening")
    print("| layer | min cosine | mean cosine | mean best-match cosine | norm ratio (Cholesky / ZCA) |")
    print("|---|---|---|---|---|")
    for k, v in runs[0][0].items():
        if k.endswith("weight") and v.dim() == 4:
            a, b = v.flatten(1), runs[1][0][k].flatten(1)
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            # Each ZCA filter against its nearest Cholesky filter: the clusters may come in another order.
            best = (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()).amax(1)
            print(f"| {k[:-7]} | {cos.min():.3f} | {cos.mean():.3f} | {best.mean():.3f} | {float(b.norm() / a.norm()):.3f} |")
    print(f"joint objective after: ZCA {runs[0][1].joint_after:.4g}, Cholesky {runs[1][1].joint_after:.4g}")


if __name__ == "__main__":
    main()
