"""A grid folder as tar bundles that fit what a device session returns (8 files of 16 MiB at most).

    python benchmarks/_bundle.py RUNS OUT [--max-bundles 4] [--mib 15]

``OUT/runs-0.tar``: every config, metrics and log file. ``OUT/runs-1.tar`` ...: the checkpoints of
unfinished cells, then the init cache's weights, each bundle at most ``--mib`` MiB, at most
``--max-bundles`` of them. Final weights and each run's ``init.pt`` stay behind: the tables and curves
need neither, and resuming needs neither. Unpack with ``tar -xf runs-K.tar -C RUNS``.
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path


def bundle(runs: Path, out: Path, max_bundles: int = 4, mib: float = 15) -> tuple[list[Path], list[Path]]:
    """Writes the bundles; returns (bundles written, files left behind for want of room)."""
    files = sorted(p for p in runs.rglob("*") if p.is_file())
    small = [p for p in files if p.suffix in (".json", ".jsonl", ".log")]
    ckpts = [p for p in files if p.name == "checkpoint.pt" and not (p.parent / "final.pt").exists()]
    cache = [p for p in files if p.suffix == ".pt" and "init-cache" in p.relative_to(runs).parts]
    limit = mib * 2**20
    groups, size, left = [[]], 0, []
    for p in ckpts + cache:
        n = p.stat().st_size
        if groups[-1] and size + n > limit:
            if len(groups) == max_bundles:
                left.append(p)
                continue
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += n
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate([small] + [g for g in groups if g]):
        path = out / f"runs-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for p in part:
                tar.add(p, arcname=str(p.relative_to(runs)))
        written.append(path)
    return written, left


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-bundles", type=int, default=4)
    p.add_argument("--mib", type=float, default=15)
    a = p.parse_args()
    if not a.runs.is_dir():
        raise SystemExit(f"_bundle: {a.runs}: no such folder")
    written, left = bundle(a.runs, a.out, a.max_bundles, a.mib)
    for path in written:
        print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    for path in left:
        print(f"left behind (no room): {path.relative_to(a.runs)}")


if __name__ == "__main__":
    main()
