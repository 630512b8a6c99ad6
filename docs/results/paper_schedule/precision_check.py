"""The paper schedule's precision check: one cell's fp32 and bf16 runs side by side, evaluation by evaluation.

    python docs/results/paper_schedule/precision_check.py [--fp32 DIR] [--bf16 DIR] [--until 10000]

Prints a markdown table (test accuracy and loss of both runs at every evaluation both have reached, up to
``--until``; the seconds each run's clock shows there) and the largest and mean absolute accuracy gap.
The seconds are the runs' own clocks (``wall`` in metrics.jsonl, carried across resumes): a run that
shared the cores with other work, or was resumed on another host, shows that work's cost too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kmeansinit.report import collect

HERE = Path(__file__).resolve().parent


def evals(folder: Path) -> dict[int, dict]:
    """The run in ``folder``'s evaluation rows by step (read as the report reads them)."""
    if not (folder / "config.json").exists():
        sys.exit(f"{folder / 'config.json'}: no such file (is {folder} a run folder?)")
    runs = collect(folder)
    if len(runs) != 1:
        sys.exit(f"{folder}: expected one run folder, found {len(runs)} (a corrupt config.json is skipped)")
    return {r["step"]: r for r in runs[0].evals}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fp32", type=Path, default=HERE / "runs" / "he-sgd" / "s0")
    p.add_argument("--bf16", type=Path, default=HERE / "runs" / "he-sgd-bf16" / "s0")
    p.add_argument("--until", type=int, default=10_000, help="last iteration compared")
    a = p.parse_args(argv)
    f, b = evals(a.fp32), evals(a.bf16)
    steps = sorted(s for s in set(f) & set(b) if s <= a.until)
    if not steps:
        sys.exit(f"{a.fp32} and {a.bf16} have no evaluation in common up to iteration {a.until}")
    print("| iteration | fp32 test acc % | bf16 test acc % | bf16 - fp32 | fp32 test loss | bf16 test loss "
          "| fp32 seconds | bf16 seconds |")
    print("|---|---|---|---|---|---|---|---|")
    gaps = []
    for s in steps:
        x, y = f[s], b[s]
        gaps.append(100 * (y["test_acc"] - x["test_acc"]))
        print(f"| {s:,} | {100 * x['test_acc']:.2f} | {100 * y['test_acc']:.2f} | {gaps[-1]:+.2f} "
              f"| {x['test_loss']:.3f} | {y['test_loss']:.3f} | {x['wall']:.0f} | {y['wall']:.0f} |")
    print(f"\n{len(steps)} evaluations; bf16 - fp32 accuracy: mean {sum(gaps) / len(gaps):+.2f}, "
          f"mean absolute {sum(map(abs, gaps)) / len(gaps):.2f}, largest absolute {max(map(abs, gaps)):.2f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
