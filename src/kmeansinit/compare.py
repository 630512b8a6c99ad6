"""Compare inits on a net and training loop of your own, each init at its own best learning rate.

The idea of :mod:`kmeansinit.fair` (docs/results/fair.md) for code we did not write: an init that
wins at one fixed learning rate may only be taking a larger step (with BN a filter's norm sets its
effective rate), so every init gets its own rate, chosen on a validation score you compute. Unlike
the grid (a short sweep, then seeds 0..n at a longer budget), every run here has the budget ``fit``
gives it, so the seeds that measure are other than the one that chose.

1. Sweep: for each init, seed 0 at every rate of ``lrs``; where the best rate lies at an end of
   the rates tried, the next rate beyond it (the ratio of the two rates at that end) is tried too,
   up to ``extend`` times, so that a best rate lies inside the range it was chosen from.
2. Measure: seeds ``1..seeds`` at that init's best rate. Seed 0 only chooses, so no run both
   chooses a rate and measures it (the sweep's best score is biased upward by the choice).

You supply ``build(seed) -> nn.Module`` (a fresh, untrained model) and ``fit(model, lr, seed) ->
float`` (train it, return a validation score, higher is better: accuracy, or minus a loss). Here
each model is initialized by :func:`kmeansinit.initialize_` with the given seed before ``fit``
sees it. With ``path`` every finished run is written to a JSON file at once, and a later call with
the same file skips the runs it holds: an interrupted comparison loses at most the run in flight.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch.nn as nn
from torch import Tensor

from .init import DATA_FREE, check_options, initialize_, seeded_options
from .report_fair import BASELINES, _stats, _welch

__all__ = ["compare_inits", "Comparison", "BASELINE_METHODS"]

#: Methods that are not k-means inits: the rows :meth:`Comparison.table` measures the others against
#: (the fair grid's baselines, and the paper's N(0, 1e-3)).
BASELINE_METHODS = ("normal", *BASELINES)


@dataclass
class Comparison:
    """What :func:`compare_inits` ran: every run, each init's chosen rate and its measured scores."""

    inits: dict  # label -> {"init": method, **options}
    runs: list = field(default_factory=list)  # {"init", "lr", "seed", "score"} in the order run (or read)
    best_lr: dict = field(default_factory=dict)  # label -> rate chosen on seed 0
    at_edge: dict = field(default_factory=dict)  # label -> True where the best rate is still an end of the rates tried
    scores: dict = field(default_factory=dict)  # label -> scores of seeds 1..n at its best rate (NaN/inf: diverged)

    def sweep(self, label: str) -> dict:
        """{rate: score} of ``label``'s seed-0 runs."""
        return {r["lr"]: r["score"] for r in self.runs if r["init"] == label and r["seed"] == 0}

    def table(self) -> str:
        """A markdown table, best mean first: each init's rate, its seeds' score (mean ± sd) and its
        difference from the best baseline (an init of :data:`BASELINE_METHODS`) by Welch's t-test.
        Diverged seeds (a score that is not finite) are counted, not averaged."""
        finite = {k: [x for x in v if math.isfinite(x)] for k, v in self.scores.items()}
        stats = {k: _stats(v) for k, v in finite.items() if v}
        bases = [k for k in stats if self.inits[k]["init"] in BASELINE_METHODS]
        best = max(bases, key=lambda k: stats[k]["mean"]) if bases else None
        rows = ["| init | best lr | seeds | score | vs best baseline (Welch p) |", "|---|---|---|---|---|"]
        for k in sorted(self.scores, key=lambda k: -stats[k]["mean"] if k in stats else math.inf):
            s, failed = stats.get(k), len(self.scores[k]) - len(finite[k])
            n = f"{len(finite[k])}" + (f" (+{failed} diverged)" if failed else "")
            edge = " (at an end)" if self.at_edge.get(k) else ""
            if s is None:
                rows.append(f"| {k} | {self.best_lr[k]:g}{edge} | {n} | – | – |")
                continue
            score = f"{s['mean']:.4g}" + (f" ± {s['sd']:.2g}" if s["n"] > 1 else "")
            if best is None or k == best:
                vs = "best baseline" if k == best else "–"
            else:
                diff, _, p = _welch(s, stats[best])
                vs = f"{diff:+.4g}" + (f" (p = {p:.3f})" if p is not None else "")
            rows.append(f"| {k} | {self.best_lr[k]:g}{edge} | {n} | {score} | {vs} |")
        return "\n".join(rows)


def _specs(inits) -> dict:
    if isinstance(inits, str) or not isinstance(inits, (Mapping, Sequence)):
        raise ValueError(f"inits must be a list of method names or a dict of label -> options, got {inits!r}")
    specs = {}
    if isinstance(inits, Mapping):
        for label, spec in inits.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"inits[{label!r}] must be a dict of options, got {spec!r}")
            specs[str(label)] = {"init": spec.get("init", label), **{k: v for k, v in spec.items() if k != "init"}}
    else:
        for method in inits:
            if not isinstance(method, str):
                raise ValueError(f"inits must be method names, got {method!r}")
            if method in specs:
                raise ValueError(f"init {method!r} is listed twice")
            specs[method] = {"init": method}
    if not specs:
        raise ValueError("inits is empty")
    for label, spec in specs.items():
        try:
            check_options(spec["init"], {k: v for k, v in spec.items() if k != "init"})
        except ValueError as e:
            raise ValueError(f"inits[{label!r}]: {e}") from None
    return specs


def _check_lrs(lrs) -> list[float]:
    try:
        out = [float(r) for r in lrs]
    except (TypeError, ValueError):
        raise ValueError(f"lrs must be a list of numbers, got {lrs!r}") from None
    if not out:
        raise ValueError("lrs is empty")
    if any(not math.isfinite(r) or r <= 0 for r in out):
        raise ValueError(f"lrs must be positive and finite, got {lrs!r}")
    if sorted(set(out)) != out:
        raise ValueError(f"lrs must be ascending without repeats, got {lrs!r}")
    return out


def _read(path: Path, specs: dict) -> tuple[dict, list, list]:
    """(the other inits the file holds, their runs, the runs of these inits), read once; a file of
    other options for one of these inits, or a run that is not one, is refused by name."""
    if not path.exists():
        return {}, [], []
    try:
        data = json.loads(path.read_text())
        runs, held = data["runs"], data["inits"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a comparison file ({e}); move it or choose another path") from None
    for label, spec in specs.items():
        if label in held and held[label] != json.loads(json.dumps(spec)):
            raise ValueError(f"{path}: holds init {label!r} as {held[label]}, not {spec}; choose another path")
    mine = [r for r in runs if isinstance(r, dict) and r.get("init") in specs]
    for r in mine:
        try:
            r.update(lr=float(r["lr"]), seed=int(r["seed"]), score=float(r["score"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: run {r!r} is not a comparison run ({e!r}); move the file or choose another path") from None
    others = [r for r in runs if not (isinstance(r, dict) and r.get("init") in specs)]
    return {k: v for k, v in held.items() if k not in specs}, others, mine


def _write(path: Path, inits: dict, runs: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"inits": inits, "runs": runs}, indent=1))
    os.replace(tmp, path)  # atomic: a kill leaves the old file or the new one


def compare_inits(build: Callable[[int], nn.Module], fit: Callable[[nn.Module, float, int], float],
                  images: Tensor | None = None, *, inits: Sequence[str] | Mapping[str, Mapping] = ("he", "lsuv", "kmeans-variance"),
                  lrs: Sequence[float], seeds: int = 3, extend: int = 2, path: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = print) -> Comparison:
    """Each of ``inits`` at its own best learning rate on ``build``'s net trained by ``fit``; see the module doc.

    Args:
        build: ``build(seed)`` returns a fresh model (its own init is overwritten), the same net for
            the same seed: the runs of one init and seed at several rates initialize it once and
            load that state into each fresh model.
        fit: ``fit(model, lr, seed)`` trains the initialized model and returns a validation score
            (higher is better). A score that is not finite (a diverged run) counts as the worst.
        images: unlabelled images, normalized as ``fit`` feeds them, for the data-dependent inits
            (None is enough when every init is data-free).
        inits: method names (``["he", "lsuv", "kmeans-variance"]``) or ``{label: {"init": method,
            **options}}`` (``{"kmeans-variance-eps1": {"init": "kmeans-variance", "zca_eps": 1.0}}``).
        lrs: ascending rates of the sweep; one rate skips it (every init at that rate).
        seeds: measured seeds per init at its best rate (seeds 1..``seeds``).
        extend: at most this many rates tried beyond the ends of ``lrs`` (per init, both ends together).
        path: a JSON file that keeps every finished run; a later call resumes from it.
        log: called with one line per run (None: silent).
    """
    specs = _specs(inits)
    rates = _check_lrs(lrs)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    if isinstance(extend, bool) or not isinstance(extend, int) or extend < 0:
        raise ValueError(f"extend must be a non-negative integer, got {extend!r}")
    needs = [k for k, s in specs.items() if s["init"] not in DATA_FREE]
    if needs and images is None:
        raise ValueError(f"inits {', '.join(needs)} need images (an unlabelled image tensor)")
    file = Path(path) if path is not None else None
    if file:
        try:  # refused now, not after the first run has finished
            json.dumps(specs)
        except TypeError as e:
            raise ValueError(f"inits: options must be JSON values (numbers, strings, lists) to be kept in {file}: {e}") from None
        file.parent.mkdir(parents=True, exist_ok=True)
    # Other inits kept in the same file are written back with every run.
    held, others, mine = _read(file, specs) if file else ({}, [], [])
    done = {(r["init"], r["lr"], r["seed"]): r for r in mine}
    result = Comparison(inits=specs, runs=list(done.values()))
    todo = len(specs) * (len(rates) + seeds)  # the plan without extensions, for the progress line
    inited: dict = {}  # (label, seed) -> the initialized model's state (build(seed) gives the same net each call)

    def run(label: str, lr: float, seed: int) -> float:
        key = (label, lr, seed)
        if key not in done:
            spec = specs[label]
            model = build(seed)
            if not isinstance(model, nn.Module):
                raise TypeError(f"build({seed}) returned {type(model).__name__}, not an nn.Module")
            t0 = time.perf_counter()
            if (label, seed) in inited:  # the sweep's rates share one init of seed 0: it runs once
                model.load_state_dict(inited[label, seed])
            else:
                options = seeded_options(spec["init"], {k: v for k, v in spec.items() if k != "init"}, seed)
                initialize_(model, spec["init"], images, **options)  # a data-free method ignores images
                inited.clear()  # only the newest: one model's state in memory
                inited[label, seed] = copy.deepcopy(model.state_dict())
            score = fit(model, lr, seed)
            try:  # a Python number or a one-element tensor; not a bool or a string
                if isinstance(score, (bool, str, bytes)):
                    raise TypeError
                value = float(score)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"fit(model, lr={lr:g}, seed={seed}) for init {label!r} returned {score!r}, "
                                "not a number") from None
            rec = dict(init=label, lr=lr, seed=seed, score=value)
            done[key] = rec
            result.runs.append(rec)
            if file:
                _write(file, {**held, **specs}, others + result.runs)
            if log:
                log(f"run {len(result.runs)} of about {todo}: {label} lr {lr:g} seed {seed}: score {value:.4g} "
                    f"({time.perf_counter() - t0:.1f} s)")
        return done[key]["score"]

    def best_of(scores: dict) -> float:
        # A diverged run (NaN, inf) ranks below every finite score; a tie goes to the smaller rate.
        return max(scores, key=lambda r: (scores[r] if math.isfinite(scores[r]) else -math.inf, -r))

    for label in specs:
        tried = list(rates)
        scores = {r: run(label, r, 0) for r in tried}
        if len(tried) > 1:
            for _ in range(extend):
                best = best_of(scores)
                if best == tried[-1]:
                    nxt = tried[-1] * tried[-1] / tried[-2]
                    tried.append(nxt)
                elif best == tried[0]:
                    nxt = tried[0] * tried[0] / tried[1]
                    tried.insert(0, nxt)
                else:
                    break
                scores[nxt] = run(label, nxt, 0)
        best = best_of(scores)
        result.best_lr[label] = best
        result.at_edge[label] = len(tried) > 1 and best in (tried[0], tried[-1])
        result.scores[label] = [run(label, best, s) for s in range(1, seeds + 1)]
    return result
