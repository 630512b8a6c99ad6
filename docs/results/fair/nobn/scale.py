"""How large is a ResNet-20 without BN's forward pass under each init? The standard deviation of the
stem's and each stage's output and of the logits on the 256 init images of a `resnet20-nobn` cell
(seed 0): the grid's own data path (5,000-image validation split held out, normalizer fitted on the
rest) and its own init specs, through `kmeansinit.train`'s `prepare_data` and `_init`.

    python docs/results/fair/nobn/scale.py [--data ../shared/data] [--inits he,xavier,lsuv,fixup,...]
"""
from __future__ import annotations

import argparse

import torch

from kmeansinit.fair import _inits
from kmeansinit.train import TrainConfig, _init, build_model, prepare_data

DEFAULT = "he,xavier,lsuv,whitening,fixup,kmeans-he-norm,kmeans-variance,kmeans-variance-eps1"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--inits", default=DEFAULT, help="names of resnet20-nobn's inits, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    specs = _inits("resnet20-nobn")
    names = a.inits.split(",")
    if unknown := [n for n in names if n not in specs]:
        raise SystemExit(f"--inits: {', '.join(unknown)} not in resnet20-nobn's grid ({', '.join(specs)})")
    cfgs = {n: TrainConfig(data=a.data, model="resnet20", batch_norm=False, val=5000, seed=0,
                           init=specs[n]["init"], init_options=specs[n].get("init_options", {})) for n in names}
    ds, pool, norm, _ = prepare_data(cfgs[names[0]])  # the same split and normalizer for every init
    stages = ["conv1", "layer1", "layer2", "layer3", "fc"]
    print("| init | " + " | ".join(s if s != "fc" else "logits" for s in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name, cfg in cfgs.items():
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, ds.num_classes, ds.train_x.shape[1])
        _init(model, cfg, pool, norm, torch.device("cpu"), progress=False)
        images = norm(pool.train_x[torch.randperm(pool.train_x.shape[0],
                                                  generator=torch.Generator().manual_seed(cfg.seed))[:cfg.init_images]])
        std = {}
        for s in stages:
            getattr(model, s).register_forward_hook(lambda m, i, o, s=s: std.__setitem__(s, float(o.std())))
        with torch.no_grad():
            model(images)
        print(f"| {name} | " + " | ".join(f"{std[s]:.2f}" for s in stages) + " |", flush=True)


if __name__ == "__main__":
    main()
