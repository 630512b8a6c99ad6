"""Stacked cells: N same-shaped trainings as one grouped model (kmeansinit.stacked) against the same N
trainings one after another, step for step (target: N = 4 stacked at least as fast on this CPU).

Each timed unit is one training step of every cell: alone, N steps of N separate models; stacked, one
step of the stacked model on the N cells' batches side by side. The two are timed interleaved in one
process (so drift hits both alike); the ratio is cell-steps per second stacked / alone.

    python benchmarks/stacked_cells.py [--model paper] [--cells 1,2,4] [--precision fp32,bf16] [--steps 10]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import append_results, pick_device, profile_lines, sgd_step, timed_many

from kmeansinit.data import BatchLoader, Normalizer
from kmeansinit.models import create_model
from kmeansinit.stacked import stack_models


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="paper")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--cells", default="1,2,4")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="profile the stacked step where it is not ahead")
    a = p.parse_args()
    dev = pick_device(a.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)
    norm = Normalizer.fit(x)
    recipe = dict(lr=1e-3, momentum=0.9, weight_decay=1e-5) if a.model == "paper" else \
        dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    lines = [f"{a.model} (width {a.width:g}), batch {a.batch_size} per cell, SGD; median of {a.steps} steps, "
             "alone and stacked interleaved.", "",
             "| cells N | precision | alone: N steps, s | stacked: 1 step, s | cell-steps/s alone | cell-steps/s stacked | stacked / alone |",
             "|---|---|---|---|---|---|---|"]
    profiles = []
    for prec in a.precision.split(","):
        for n in map(int, a.cells.split(",")):
            models = []
            for i in range(n):
                torch.manual_seed(i)
                models.append(create_model(a.model, width=a.width).to(dev).to(memory_format=torch.channels_last))
            stacked = stack_models(models).to(memory_format=torch.channels_last)
            opts = [torch.optim.SGD(m.parameters(), **recipe) for m in models]
            opt_s = torch.optim.SGD(stacked.parameters(), **recipe)
            loaders = [BatchLoader(x, y, a.batch_size, norm, seed=i, crop=0 if a.model == "paper" else 4, device=dev)
                       for i in range(n)]
            state = {"alone": 0, "stacked": 0}

            def autocast():
                return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")

            def alone():
                state["alone"] += 1
                for m, o, ld in zip(models, opts, loaders):
                    sgd_step(m, o, *ld.batch(state["alone"]), prec == "bf16", dev)

            def together():
                state["stacked"] += 1
                batches = [ld.batch(state["stacked"]) for ld in loaders]
                xb = torch.cat([b[0] for b in batches], 1).contiguous(memory_format=torch.channels_last)
                with autocast():
                    out = stacked(xb).float().reshape(xb.shape[0], n, -1)
                    loss = torch.stack([F.cross_entropy(out[:, i], b[1]) for i, b in enumerate(batches)]).sum()
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                opt_s.step()

            t_alone, t_stacked = timed_many([alone, together], a.steps, dev)
            lines.append(f"| {n} | {prec} | {t_alone:.3f} | {t_stacked:.3f} | {n / t_alone:.2f} | {n / t_stacked:.2f} | "
                         f"{t_alone / t_stacked:.2f}x |")
            print(lines[-1], flush=True)
            if a.profile and n > 1 and t_stacked > t_alone:
                profiles += profile_lines(together, f"stacked step, N = {n}, {prec}", dev, repeats=2)
                profiles += profile_lines(alone, f"N steps alone, N = {n}, {prec}", dev, repeats=2)
    append_results(f"Stacked cells vs one after another ({a.model}, {dev.type})", dev, lines + [""] + profiles)


if __name__ == "__main__":
    main()
