"""Training-step time of the zoo models at the widths a grid could use: what sizes a grid on this machine.

One SGD step (batch 128, channels-last, as kmeansinit.train takes it) per model and width, fp32 and
bf16 autocast, medians over ``--steps`` interleaved calls, and the epoch it implies (351 steps: the
45,000 training images left beside a 5,000-image validation split). Ratios against PaperNet's fp32
step in the same process, so a grid's cost can be read off in PaperNet epochs.

    python benchmarks/zoo_step_time.py [--models paper,resnet20,vgg11:0.5,mobilenetv2:0.5,mobilenetv2:0.25]
        [--steps 5] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from _common import append_results, sgd_step, timed_many

from kmeansinit import create_model

EPOCH_STEPS = 351  # 45,000 / 128


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="paper,resnet20,vgg11:0.5,mobilenetv2:0.5,mobilenetv2:0.25",
                   help="comma-separated NAME[:WIDTH]")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a grid cell runs on one)")
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(a.batch_size, 3, 32, 32, generator=g)
    yb = torch.randint(0, 10, (a.batch_size,), generator=g)
    specs = []
    for item in a.models.split(","):
        name, _, width = item.partition(":")
        specs.append((name, float(width or 1.0)))
    if ("paper", 1.0) not in specs:
        specs.insert(0, ("paper", 1.0))  # the baseline every ratio is against
    fns, labels = [], []
    for name, width in specs:
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = create_model(name, width=width).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            fns.append(lambda m=model, o=opt, b=bf16: sgd_step(m, o, xb, yb, b, dev))
            labels.append((name, width, "bf16" if bf16 else "fp32",
                           sum(q.numel() for q in model.parameters())))
    times = timed_many(fns, a.steps, dev, warmup=2)
    base = times[next(i for i, lab in enumerate(labels) if lab[:3] == ("paper", 1.0, "fp32"))]
    lines = ["| model | width | parameters | precision | s per step | s per epoch (351 steps) | x PaperNet fp32 step |",
             "|---|---|---|---|---|---|---|"]
    for (name, width, prec, n), t in zip(labels, times):
        lines.append(f"| {name} | {width:g} | {n:,} | {prec} | {t:.3f} | {t * EPOCH_STEPS:.0f} | {t / base:.1f} |")
    append_results(f"Zoo training-step time (cpu, batch {a.batch_size}, {a.threads} thread)", dev, lines)


if __name__ == "__main__":
    main()
