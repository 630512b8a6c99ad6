"""Table 2 at the paper's schedule, as far as its cells have run: one row per cell folder.

    python docs/results/paper_schedule/progress.py [--runs docs/results/paper_schedule/runs]

For each cell (``<init>-<optimizer>[-bf16]/s<seed>``): its precision, the iterations it has reached,
its latest test accuracy and loss, its best test accuracy so far (and where), the lowest test loss
(and where), and the paper's final number for that init and optimizer (Table 2; our own rows have
none). A cell that has not finished is marked so: its latest row is not a final accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Table 2 of the paper: final test accuracy (%) after 75,000 iterations.
PAPER = {("normal", "sgd"): 69.7, ("xavier", "sgd"): 75.1, ("he", "sgd"): 74.0, ("kmeans-paper", "sgd"): 76.7,
         ("normal", "adam"): 80.1, ("xavier", "adam"): 80.6, ("he", "adam"): 81.1, ("kmeans-paper", "adam"): 80.3}


def rows(folder: Path) -> list[dict]:
    out = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and "test_acc" in row:
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    a = p.parse_args(argv)
    if not a.runs.is_dir():
        sys.exit(f"{a.runs}: no such folder")
    print("| cell | precision | iterations | latest test acc % | best test acc % (at) | lowest test loss (at) "
          "| latest test loss | paper's final % |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg_path in sorted(a.runs.glob("*/s*/config.json")):
        folder = cfg_path.parent
        try:
            cfg = json.loads(cfg_path.read_text())
            evals = rows(folder)
        except (OSError, ValueError) as e:
            sys.exit(f"{folder}: unreadable run folder ({e})")
        if not evals:
            print(f"| {folder.parent.name}/{folder.name} | {cfg.get('precision', 'fp32')} | 0 | – | – | – | – | – |")
            continue
        last = evals[-1]
        best = max(evals, key=lambda r: r["test_acc"])
        low = min(evals, key=lambda r: r["test_loss"])
        total = cfg.get("resolved_iterations") or cfg.get("iterations")
        done = last["step"] == total and (folder / "final.pt").exists() or not (folder / "checkpoint.pt").exists()
        reached = f"{last['step']:,}" + ("" if done else f" of {total:,} (unfinished)")
        paper = PAPER.get((cfg["init"], cfg.get("optimizer", "sgd")))
        print(f"| {folder.parent.name}/{folder.name} | {cfg.get('precision', 'fp32')} | {reached} "
              f"| {100 * last['test_acc']:.2f} | {100 * best['test_acc']:.2f} ({best['step']:,}) "
              f"| {low['test_loss']:.3f} ({low['step']:,}) | {last['test_loss']:.3f} "
              f"| {'' if paper is None else f'{paper:.1f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
