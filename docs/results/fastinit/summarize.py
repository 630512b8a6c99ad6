"""The tables of docs/results/fastinit/README.md's thirty-first-session section, from the run folders here.

    python docs/results/fastinit/summarize.py [REFERENCE FOLDER ...]

Each FOLDER holds ``s<seed>/metrics.jsonl`` runs; per folder, validation (test) accuracy at the end of
each seed's run, their mean ± sd, and the difference from REFERENCE's means by Welch's t-test (the
fair report's test). Default: the PaperNet comparison, then the ResNet-20 one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kmeansinit.report_fair import _stats, _welch

HERE = Path(__file__).resolve().parent
DEFAULT = [["variance-amx", "kmeans-fast", "kmeans-lsuv1", "lsuv-amx"],
           ["resnet20/kmeans-variance-eps1", "resnet20/kmeans-fast", "resnet20/lsuv"]]


def finals(folder: Path) -> dict[int, tuple[float, float]]:
    """seed -> (validation, test) accuracy of the run's last evaluation."""
    out = {}
    for run in folder.glob("s*/metrics.jsonl"):
        last = json.loads(run.read_text().strip().splitlines()[-1])
        if "test_acc" not in last:
            raise SystemExit(f"{run}: the run has not finished (no test accuracy in its last line)")
        out[int(run.parent.name[1:])] = (last["val_acc"], last["test_acc"])
    if not out:
        raise SystemExit(f"{folder}: no s<seed>/metrics.jsonl runs here")
    return dict(sorted(out.items()))


def table(names: list[str]) -> list[str]:
    runs = {n: finals(HERE / n) for n in names}
    ref = {i: _stats([v[i] for v in runs[names[0]].values()]) for i in (0, 1)}
    lines = [f"| folder | seeds | validation (test) per seed | mean val ± sd | mean test ± sd | val - {names[0]} (Welch p) | test - {names[0]} (Welch p) |",
             "|---|---|---|---|---|---|---|"]
    for n, r in runs.items():
        st = {i: _stats([v[i] for v in r.values()]) for i in (0, 1)}
        per = ", ".join(f"{100 * v:.1f} ({100 * t:.1f})" for v, t in r.values())
        cells = []
        for i in (0, 1):
            if n == names[0]:
                cells.append("")
                continue
            diff, _, p = _welch(st[i], ref[i])
            cells.append(f"{100 * diff:+.1f} (p = {p:.3f})" if p is not None else f"{100 * diff:+.1f}")
        lines.append(f"| `{n}` | {len(r)} | {per} | {100 * st[0]['mean']:.1f} ± {100 * st[0]['sd']:.1f} | "
                     f"{100 * st[1]['mean']:.1f} ± {100 * st[1]['sd']:.1f} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv: list[str]) -> None:
    for names in ([argv] if argv else DEFAULT):
        print("\n".join(table(names)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
