"""Final runs of chosen inits at given rates, outside the sweep: how fair/fp32's precision checks ran.

The grid (``kmeansinit reproduce fair``) picks each init's rate by its own sweep. To rerun a
baseline's final seeds in another precision at the rate its sweep chose (the bf16 grid's LSUV on
VGG-11 and Xavier on MobileNetV2, rerun in fp32 beside the fp32 candidates), this builds the same
cells as the grid's final stage, ``kmeansinit.fair.final_cells``, and runs the unfinished ones:

    python docs/results/fair/fp32/finals.py --arch vgg11 lsuv=0.025 --seeds 3 --out runs/fair-fp32
    python docs/results/fair/fp32/finals.py --arch mobilenetv2 xavier=0.025 --seeds 3 --out runs/fair-fp32
    python docs/results/fair/fp32/finals.py --arch resnet20 lsuv=0.05 kmeans-variance-eps1=0.05 --seeds 4 --out runs/fair-fp32

Finished cells are skipped and stopped ones resume, as in the grid.
"""
from __future__ import annotations

import argparse
import sys

from kmeansinit.experiments import run_grid
from kmeansinit.fair import FAIR_ARCHS, _inits, final_cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(FAIR_ARCHS))
    p.add_argument("rates", nargs="+", metavar="INIT=LR")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/fair-fp32")
    p.add_argument("--data", default="../shared/data")
    a = p.parse_args(argv)
    best = {}
    for item in a.rates:
        name, eq, lr = item.partition("=")
        if name not in _inits(a.arch):
            sys.exit(f"finals.py: {name!r} is not an init of {a.arch}; choose from {', '.join(sorted(_inits(a.arch)))}")
        try:
            best[name] = float(lr)
        except ValueError:
            sys.exit(f"finals.py: {item!r} is not INIT=LR")
    cells = final_cells(a.out, a.arch, a.optimizer, best, seeds=a.seeds, data=a.data, precision=a.precision)
    failed = run_grid(cells, jobs=a.jobs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
