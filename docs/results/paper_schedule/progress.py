"""Table 2 at the paper's schedule, as far as its cells have run: one row per cell folder.

    python docs/results/paper_schedule/progress.py [--runs docs/results/paper_schedule/runs] [--at STEP ...] [--tail K]

For each cell (``<init>-<optimizer>[-bf16]/s<seed>``): its precision, the iterations it has reached,
its latest test accuracy and loss, its latest training loss (the running mean of the last
logging interval's augmented batches), its best test accuracy so far (and where), the lowest test loss
(and where), and the paper's final number for that init and optimizer (Table 2; our own rows have
none). A cell that has not finished is marked so: its latest row is not a final accuracy. ``--at``
adds each cell's test accuracy at those iterations (cells that reached them), to compare cells that
have run for different lengths at the same point. ``--tail K`` adds the mean and standard deviation
of each cell's last K evaluations: one evaluation of one run moves by a point or two from its
neighbours, so the mean over the schedule's last stretch is the steadier final figure (a cell with
fewer than K evaluations gets none). ``--into paper_schedule.md`` writes the table in place of the
one under "## Table 2 so far" (``--section``) instead of printing it; nothing else in the file changes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from kmeansinit.report import PAPER, collect  # PAPER: Table 2's final accuracies, by "<init>-<optimizer>"

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    from _doc import add_into_args, emit  # this folder's helper: run as a script, its folder is on sys.path
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--at", type=int, nargs="*", default=[], metavar="STEP", help="also the test accuracy at these iterations")
    p.add_argument("--tail", type=int, default=0, metavar="K", help="also the mean and sd of the last K evaluations")
    add_into_args(p, "## Table 2 so far")
    a = p.parse_args(argv)
    if not a.runs.is_dir():
        sys.exit(f"{a.runs}: no such folder")
    if a.tail < 0 or a.tail == 1:
        sys.exit(f"--tail {a.tail}: needs at least 2 evaluations for a standard deviation (or 0 for none)")
    out: list[str] = []
    tail_head = f" mean of last {a.tail} evals % (sd, from) |" if a.tail else ""
    out.append("| cell | precision | iterations | latest test acc % | best test acc % (at) | lowest test loss (at) "
               "| latest test loss | latest train loss | paper's final % |" + "".join(f" acc % at {n:,} |" for n in a.at)
               + tail_head)
    out.append("|---|---|---|---|---|---|---|---|---|" + "---|" * (len(a.at) + bool(a.tail)))
    for run in collect(a.runs):  # the report's reader: metrics.jsonl rows, a line cut by a kill skipped
        cell, cfg, evals = f"{run.group}/s{run.seed}", run.config, run.evals
        if not evals:
            out.append(f"| {cell} | {cfg.get('precision', 'fp32')} | 0 | – | – | – | – | – | – |" + " – |" * (len(a.at) + bool(a.tail)))
            continue
        last = evals[-1]
        best = max(evals, key=lambda r: r["test_acc"])
        low = min(evals, key=lambda r: r["test_loss"])
        total = cfg.get("resolved_iterations") or cfg.get("iterations")
        reached = f"{last['step']:,}" + ("" if run.finished else f" of {total:,} (unfinished)")
        at = {r["step"]: r["test_acc"] for r in evals}
        train_loss = next((r["train_loss"] for r in reversed(run.rows) if "train_loss" in r), float("nan"))
        paper = PAPER.get(f"{cfg['init']}-{cfg.get('optimizer', 'sgd')}")
        out.append(f"| {cell} | {cfg.get('precision', 'fp32')} | {reached} "
                   f"| {100 * last['test_acc']:.2f} | {100 * best['test_acc']:.2f} ({best['step']:,}) "
                   f"| {low['test_loss']:.3f} ({low['step']:,}) | {last['test_loss']:.3f} | {train_loss:.3f} "
                   f"| {'' if paper is None else f'{100 * paper:.1f}'} |"
                   + "".join(f" {100 * at[n]:.2f} |" if n in at else " – |" for n in a.at) + _tail(evals, a.tail))
    emit(out, a)
    return 0


def _tail(evals: list[dict], k: int) -> str:
    """The mean and sd of the last ``k`` test accuracies, with the iteration the stretch starts at."""
    if not k:
        return ""
    if len(evals) < k:
        return " – |"
    accs = [100 * r["test_acc"] for r in evals[-k:]]
    return f" {statistics.mean(accs):.2f} ({statistics.stdev(accs):.2f}, {evals[-k]['step']:,}) |"


if __name__ == "__main__":
    raise SystemExit(main())
