"""Which settings of the fast ("lloyd") solver reach the joint objective of the paper's recipe, and how fast.

Runs the paper's recipe (momentum SGD, batch 64, 256 images, sum reduction, lambda = 100) recording
its joint objective at a few step counts, then the Lloyd solver with several refinement lengths and
learning rates, on the same model and images. Evidence for the defaults of ``kmeans_init_``.

    python benchmarks/solver_sweep.py [--device auto] [--paper-steps 10000] [--gated] [--lloyd 3,5,10]
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import append_results, pick_device

from kmeansinit import PaperNet, joint_objective, kmeans_init_


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--paper-steps", type=int, default=10_000)
    p.add_argument("--gated", action="store_true")
    p.add_argument("--refine", default="0,50,100,200,400")
    p.add_argument("--lrs", default="0.001,0.003,0.01")
    p.add_argument("--lloyd", default="10", help="Lloyd iterations per layer (comma list)")
    a = p.parse_args()
    dev = pick_device(a.device)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(256, 3, 32, 32, generator=g) * 2 - 1).to(dev)
    torch.manual_seed(0)
    base = PaperNet(gated=a.gated).to(dev)

    def fresh():
        m = PaperNet(gated=a.gated).to(dev)
        m.load_state_dict(base.state_dict())
        return m

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    lines = [f"model: PaperNet(gated={a.gated}), 256 uniform-noise images, lambda = 100, sum reduction", "",
             "| solver | settings | seconds | joint objective |", "|---|---|---|---|"]
    lines.append(f"| none (He-uniform default init) | | | {joint_objective(base, images):.5g} |")
    if a.paper_steps:  # 0 skips the reference (its 10,000 steps are the slow part on a CPU)
        model = fresh()
        t0 = time.perf_counter()
        rep = kmeans_init_(model, images, solver="gradient", steps=a.paper_steps, scale="unit", progress=False)
        sync()
        lines.append(f"| paper (momentum SGD, lr 1e-5) | {a.paper_steps} steps | {time.perf_counter() - t0:.1f} | "
                     f"{joint_objective(model, images):.5g} |")
        traj = ", ".join(f"{s}: {v:.4g}" for s, v in rep.history[:: max(1, len(rep.history) // 10)])
        lines.insert(0, f"paper recipe, joint objective on each step's batch of 64 (step: value): {traj}")
    for its in [int(x) for x in a.lloyd.split(",")]:
        for refine in [int(x) for x in a.refine.split(",")]:
            for lr in [float(x) for x in a.lrs.split(",")] if refine else [0.0]:
                model = fresh()
                sync()
                t = time.perf_counter()
                kmeans_init_(model, images, steps=its, refine_steps=refine, lr=lr or None, progress=False)
                sync()
                lines.append(f"| lloyd | {its} Lloyd its/layer, {refine} Adam steps, lr {lr:g} | "
                             f"{time.perf_counter() - t:.1f} | {joint_objective(model, images):.5g} |")
    append_results(f"Joint solver sweep ({dev.type})", dev, lines)


if __name__ == "__main__":
    main()
