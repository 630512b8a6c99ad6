"""ZCA regularizer screen for the `kmeans-variance` preset (issue 12, item 6).

Each net's cells are the fair grid's own sweep cells (``kmeansinit.fair``: same recipe, width,
validation split, bf16, one epoch) at the rate the grid chose for `kmeans-variance` there, with
``zca_eps`` in {0.01 (the preset's default), 0.1, 1.0} and seeds 0 and 1. Chosen on the validation split.

    python docs/results/epsscreen/screen.py [ARCH ...]     # default: vgg11 resnet20 paper mobilenetv2
    kmeansinit report runs/epsscreen/ARCH

Run folders: runs/epsscreen/ARCH/eps<E>/s<S> (resumable: rerun the command).
"""
import sys
from pathlib import Path

from kmeansinit.experiments import _cell, run_grid
from kmeansinit.fair import FAIR_ARCHS, _base

#: the fair grid's chosen rate for kmeans-variance (docs/results/fair.md)
RATES = {"vgg11": 0.025, "resnet20": 0.05, "paper": 0.016, "mobilenetv2": 0.05}
EPS = (0.01, 0.1, 1.0)
SEEDS = (0, 1)


def cells(arch: str, out: Path = Path("runs/epsscreen")):
    a = FAIR_ARCHS[arch]
    base = _base(a, "sgd", "../shared/data", 5000, "bf16", a.sweep_epochs)
    return [_cell(out / arch, f"eps{e}/s{s}", base, init="kmeans-variance", init_options=dict(zca_eps=e),
                  lr=RATES[arch], seed=s, init_cache=str(out / "init-cache" / arch))
            for e in EPS for s in SEEDS]


if __name__ == "__main__":
    archs = sys.argv[1:] or list(RATES)
    for arch in archs:
        if arch not in RATES:
            sys.exit(f"screen.py: unknown architecture {arch!r}; choose from {', '.join(RATES)}")
    failed = [c for arch in archs for c in run_grid(cells(arch), jobs=2)]
    sys.exit(1 if failed else 0)
