"""How large is a ResNet-20 without BN's forward pass under each init? The standard deviation of the
stem's and each stage's output and of the logits on 256 CIFAR-10 training images, normalized and
seeded as `kmeansinit train` does (seed 0), for the inits of the `resnet20-nobn` grid.

    python docs/results/fair/nobn/scale.py [--data ../shared/data] [--inits he,xavier,lsuv,fixup,...]
"""
from __future__ import annotations

import argparse

import torch

from kmeansinit import create_model, initialize_
from kmeansinit.data import Normalizer, load_cifar
from kmeansinit.init import DATA_FREE, seeded_options

INITS = {"he": {}, "xavier": {}, "lsuv": {}, "whitening": {}, "fixup": {}, "kmeans-he-norm": {},
         "kmeans-variance": {}, "kmeans-variance-eps1": dict(zca_eps=1.0)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--inits", default=",".join(INITS))
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = load_cifar(a.data)
    norm = Normalizer.fit(ds.train_x)
    idx = torch.randperm(ds.train_x.shape[0], generator=torch.Generator().manual_seed(0))[:256]
    images = norm(ds.train_x[idx])
    stages = ["conv1", "layer1", "layer2", "layer3", "fc"]
    print("| init | " + " | ".join(s if s != "fc" else "logits" for s in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name in a.inits.split(","):
        method = "kmeans-variance" if name == "kmeans-variance-eps1" else name
        torch.manual_seed(0)
        model = create_model("resnet20", batch_norm=False)
        opts = seeded_options(method, {**INITS[name], **({"progress": False} if "kmeans" in method else {})}, 0)
        initialize_(model, method, None if method in DATA_FREE else images, **opts)
        std = {}
        for s in stages:
            getattr(model, s).register_forward_hook(lambda m, i, o, s=s: std.__setitem__(s, float(o.std())))
        with torch.no_grad():
            model(images)
        print(f"| {name} | " + " | ".join(f"{std[s]:.2f}" for s in stages) + " |", flush=True)


if __name__ == "__main__":
    main()
