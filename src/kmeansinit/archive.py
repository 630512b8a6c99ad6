"""Copy a grid's run folders into a results folder that can be committed (``kmeansinit archive``).

A run folder holds a few kilobytes of results (``config.json``, ``metrics.jsonl``,
``init_report.json``, ``diverged.json`` for a run whose loss turned NaN) beside megabytes of weights
(``init.pt``, ``checkpoint.pt``, ``checkpoint.prev.pt``, ``final.pt``). docs/results/ keeps the results
of every finished run and, where a grid must survive a new machine (the 75,000-iteration cells), the
newest checkpoint of each unfinished one, so ``kmeansinit train --resume`` goes on from the copy.

The copy mirrors the source's layout, so ``kmeansinit report`` reads either, and
:func:`kmeansinit.experiments.finished` treats a copied finished run as done (its metrics end with the
final evaluation) and a copied checkpoint as a run to resume.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .experiments import finished
from .train import CKPT, PREV, RunError, newest_readable_checkpoint

__all__ = ["RESULT_FILES", "ArchiveSummary", "archive_runs"]

RESULT_FILES = ("config.json", "metrics.jsonl", "init_report.json", "diverged.json")


@dataclass
class ArchiveSummary:
    """What :func:`archive_runs` did, by run folder (relative to the source)."""

    finished: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # copied with their newest checkpoint
    skipped: list[str] = field(default_factory=list)  # unfinished, not copied (no ``checkpoints``)
    unreadable: list[str] = field(default_factory=list)  # unfinished, no checkpoint --resume could read

    def __str__(self) -> str:
        text = f"{len(self.finished)} finished runs copied"
        if self.in_flight:
            text += f", {len(self.in_flight)} unfinished with their newest checkpoint"
        if self.skipped:
            text += f", {len(self.skipped)} unfinished left out (--checkpoints copies them)"
        if self.unreadable:
            text += f", {len(self.unreadable)} unfinished left out with no readable checkpoint: {', '.join(self.unreadable)}"
        return text


def _run_dirs(src: Path):
    """Every run folder under ``src`` (one with a config.json), init caches left out."""
    for cfg in sorted(src.rglob("config.json")):
        d = cfg.parent
        if "init-cache" not in d.relative_to(src).parts:
            yield d


def archive_runs(src: str | Path, dst: str | Path, *, checkpoints: bool = False,
                 weights: bool = False) -> ArchiveSummary:
    """Copy the results of every run folder under ``src`` to the same relative path under ``dst``.

    Finished runs (``final.pt`` written, or metrics ending with the final evaluation) and diverged ones
    get :data:`RESULT_FILES`; with ``weights`` also ``final.pt``. With ``checkpoints``, an unfinished run
    gets its results and the checkpoint ``--resume`` would read (as ``checkpoint.pt``: the newest readable
    one, :func:`~kmeansinit.train.newest_readable_checkpoint`); without, it is left out. A run that
    has finished since an earlier copy loses that copy's checkpoints. Files are replaced whole, so a copy
    interrupted half-way leaves every file either old or new; a run's folder in ``dst`` that the source no
    longer has is left alone (it may be an earlier machine's result).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder of runs")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"{dst}: the archive must lie outside the folder of runs it copies ({src})")
    summary = ArchiveSummary()
    for d in _run_dirs(src):
        rel = d.relative_to(src)
        done = finished(d) or (d / "diverged.json").exists()
        ckpt = None
        if not done and checkpoints:
            try:
                hit = newest_readable_checkpoint(d)
            except RunError:
                summary.unreadable.append(str(rel))
                continue
            ckpt = None if hit is None else hit[0]
        if not done and ckpt is None:
            summary.skipped.append(str(rel))
            continue
        try:
            json.loads((d / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from e
        out = dst / rel
        out.mkdir(parents=True, exist_ok=True)
        names = list(RESULT_FILES) + (["final.pt"] if done and weights else [])
        for name in names:
            if (d / name).is_file():
                _copy(d / name, out / name)
        if done:
            for name in (CKPT, PREV):  # the run finished since an earlier copy of it
                (out / name).unlink(missing_ok=True)
            summary.finished.append(str(rel))
        else:
            _copy(ckpt, out / CKPT)
            (out / PREV).unlink(missing_ok=True)
            summary.in_flight.append(str(rel))
    return summary


def _copy(a: Path, b: Path) -> None:
    tmp = b.with_name(b.name + ".tmp")
    shutil.copyfile(a, tmp)
    tmp.replace(b)
