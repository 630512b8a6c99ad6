"""The paper's experiment grids as lists of ``TrainConfig`` cells, and a runner that resumes them.

Each cell is an ordinary run folder ``OUT/<cell name>``; a finished one (:func:`finished`) is skipped and
a started one resumed, so an interrupted grid picks up where it stopped. Cells run as
``python -m kmeansinit train ...`` subprocesses, the same command lines ``--dry-run`` prints for a
cluster scheduler. Data-dependent inits are shared through ``OUT/init-cache``: the SGD and Adam cells
of one init and seed reuse one init.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import threading
from dataclasses import dataclass
from pathlib import Path

from .train import RECIPES, Interrupted, TrainConfig

__all__ = ["Cell", "SCHEDULES", "GRIDS", "build_grid", "select_cells", "row_of", "run_grid", "cell_command", "job_command", "plan_jobs", "finished",
           "STUDY_VARIANTS"]

#: Schedules: the paper's 75,000 iterations, and a short one: 1,200 iterations (about 3 epochs), about
#: 3.7 minutes a cell on a 2-core CPU (0.155 s a step plus 12 evaluations), so the paper's 8 cells of
#: table2 and the once-per-seed 10,000-step kmeans-paper init take about 40 minutes (see README).
SCHEDULES = {
    "paper": dict(iterations=75_000, eval_every=1000, log_every=100, checkpoint_every=1000),
    "short": dict(iterations=1200, eval_every=100, log_every=50, checkpoint_every=400),
    # The study's protocol: 3 epochs (lr halves after 2), evaluated every quarter epoch.
    "study": dict(epochs=3, eval_every=98, log_every=39, checkpoint_every=390),
    # For tests and smoke runs.
    "tiny": dict(iterations=8, eval_every=4, log_every=2, checkpoint_every=4),
}

#: Gradient steps of the ablation's joint inits. The paper's recipe converges early (its joint
#: objective is 99.5% of its 10,000-step value after 1,000 steps: benchmarks/RESULTS.md, "Joint
#: solver sweep"), so the short schedule gives each lambda 2,000 steps, a fifth of the CPU time;
#: the lambda = 100, 10,000-step init is table2's kmeans-paper row.
ABLATION_INIT_STEPS = {"paper": 10_000, "short": 2_000, "study": 2_000, "tiny": 2}

TABLE2_INITS = {
    "normal": dict(init="normal"),
    "xavier": dict(init="xavier"),
    "he": dict(init="he"),
    "kmeans-paper": dict(init="kmeans-paper"),  # the paper's row: its own recipe, lambda = 100
    "kmeans": dict(init="kmeans"),  # our preset, an extra row
    # The same k-means directions, each layer scaled to unit output variance: with every init at its
    # own best rate, the one ahead of the best baseline on PaperNet with SGD (docs/results/fair.md,
    # 5 seeds), hence "ours" at the paper's schedule.
    "kmeans-variance": dict(init="kmeans-variance"),
}

#: Variants of the k-means study (issue: "the k-means init must earn its keep").
#: He, Xavier and the whitening init are the baselines; each k-means variant names its options
#: explicitly so the study stays valid whatever the presets become. A 1-epoch, one-seed screen of
#: more variants (docs/results/study.md) chose these.
STUDY_VARIANTS = {
    "he": dict(init="he"),
    "xavier": dict(init="xavier"),
    "whitening": dict(init="whitening"),
    # Layer-wise spherical k-means on contrast-normalized, ZCA-whitened patches, +/- pairs, Xavier norm.
    "kmeans-zca-pairs-xavier": dict(init="kmeans-layerwise", init_options=dict(preprocess="zca", pairs=True,
                                                                               scale="xavier")),
}


def _lw(**kw) -> dict:
    return dict(init="kmeans-layerwise", init_options=kw)


#: The one-seed, one-epoch SGD screen that picked the study's variants (constant lr).
SCREEN_VARIANTS = {
    "he": dict(init="he"),
    "xavier": dict(init="xavier"),
    "lw-center-he": _lw(preprocess="center"),
    "lw-centerpairs-xavier": _lw(preprocess="center", pairs=True, scale="xavier"),
    "lw-orth-he": _lw(orthogonal=True),
    "lw-center-orth-xavier": _lw(preprocess="center", orthogonal=True, scale="xavier"),
    "lw-zcapairs-he": _lw(preprocess="zca", pairs=True),
    "lw-zcapairs-xavier": _lw(preprocess="zca", pairs=True, scale="xavier"),
    "lw-zcapairs-variance": _lw(preprocess="zca", pairs=True, scale="variance"),
    "lw-zcapairs-orth-xavier": _lw(preprocess="zca", pairs=True, orthogonal=True, scale="xavier"),
    "first1-zcapairs-xavier": _lw(preprocess="zca", pairs=True, scale="xavier", layers=1),
}


def finished(out: str | os.PathLike) -> bool:
    """Whether the run in folder ``out`` completed: its ``final.pt`` exists or, for a results folder kept
    without its weights or checkpoints (as docs/results/ commits them), ``metrics.jsonl`` holds the final
    evaluation at the run's last step (``config.json``'s ``resolved_iterations``). A folder with a
    checkpoint but no ``final.pt`` is resumed instead (a kill can fall between the last row and final.pt)."""
    out = Path(out)
    if (out / "final.pt").exists():
        return True
    if (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists():
        return False
    try:
        last = json.loads((out / "config.json").read_text()).get("resolved_iterations")
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError, AttributeError):
        return False
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        return isinstance(row, dict) and last is not None and row.get("step") == last and "test_acc" in row
    return False


#: What makes two runs the same cell: a folder whose config.json differs from a cell's in one of these
#: is another cell's run (the folder's ``out``, data path, threads and logging may differ).
IDENTITY_FIELDS = ("model", "width", "gated", "batch_norm", "patch_norm", "init", "init_options", "optimizer", "lr", "seed",
                   "labels", "val", "epochs", "iterations", "lr_schedule", "weight_decay", "momentum", "precision")


@dataclass
class Cell:
    """One run of a grid: a name and the configuration it trains (its folder is ``config.out``)."""

    name: str
    config: TrainConfig

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def done(self) -> bool:
        """Finished, or stopped by a NaN loss (a rerun would only diverge again)."""
        return finished(self.out) or (self.out / "diverged.json").exists()

    def stale(self) -> str | None:
        """Why the run already in this cell's folder is not this cell (``None`` when it is, or there is none).

        A folder is resumed, or skipped when finished, by its own config.json; without this check a
        grid whose choice changed (the fair grid's best rate after a refined sweep) would silently
        keep the old run as the new cell's result."""
        path = self.out / "config.json"
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # train names a corrupt config.json itself
        want = dataclasses.asdict(self.config)
        for key in IDENTITY_FIELDS:
            if key in saved and json.dumps(saved[key], sort_keys=True) != json.dumps(want[key], sort_keys=True):
                return f"{path} holds a run with {key}={saved[key]!r}, this cell asks {key}={want[key]!r}"
        return None


def _cell(grid_out: Path, name: str, base: dict, **kw) -> Cell:
    fields = {**base, **kw, "out": str(grid_out / name), "tag": name.rsplit("/s", 1)[0] if "/s" in name else name}
    fields.setdefault("init_cache", str(grid_out / "init-cache"))
    return Cell(name, TrainConfig(**fields))


def build_grid(grid: str, *, out: str | os.PathLike, schedule: str = "short", seeds: int = 1, data: str = "../shared/data",
               init: str | None = None, extra: dict | None = None, precision: str | None = None) -> list[Cell]:
    """The cells of ``grid`` (table2, table3, ablation, study) for ``seeds`` seeds.

    ``precision`` (``"fp32"``, the default, or ``"bf16"``): the cells' training precision. A bf16 cell's
    name (and folder) ends in ``-bf16`` (``he-sgd-bf16/s0``), so one grid folder can hold both
    precisions of a cell side by side (the paper schedule's precision check) and neither is taken
    for the other."""
    if precision not in (None, "fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    base = {"data": data, **SCHEDULES[schedule], **(extra or {})}
    if precision == "bf16":
        base["precision"] = "bf16"
    if grid == "ablation":
        cells = _ablation(Path(out), base, seeds, init, steps=ABLATION_INIT_STEPS[schedule])
    else:
        cells = GRIDS[grid](Path(out), base, seeds, init)
        if schedule == "tiny":  # a smoke run of the whole grid: the k-means inits' solvers take 2 steps too
            for c in cells:
                if c.config.init.startswith("kmeans") and not c.config.init_options:
                    c.config.init_options = dict(steps=2) if c.config.init == "kmeans-paper" else dict(steps=2, refine_steps=1)
    if precision == "bf16":
        cells = [_bf16_name(c, Path(out)) for c in cells]
    return cells


def row_of(cell: Cell) -> str:
    """A cell's row: its name without the seed, the ``-bf16`` suffix or the optimizer
    (``he-sgd-bf16/s0`` -> ``he``; ``cifar10-gated/s0`` -> ``cifar10-gated``)."""
    row = cell.name.split("/")[0].removesuffix("-bf16")
    return row.removesuffix(f"-{cell.config.optimizer}")


def select_cells(cells: list[Cell], *, optimizers=None, only=None, grid: str = "the grid") -> list[Cell]:
    """The cells training with one of ``optimizers`` and in one of the rows ``only`` (:func:`row_of`;
    None: every one), in the order they are named: seed by seed, then optimizer by optimizer as given,
    then row by row as given (``--optimizer sgd --only he --only xavier``: He/SGD, then Xavier/SGD,
    for each seed in turn). ``ValueError`` names an optimizer or row no cell has."""
    rows = list(dict.fromkeys(row_of(c) for c in cells))
    opts = list(dict.fromkeys(c.config.optimizer for c in cells))
    for given, have, what in ((optimizers, opts, "optimizer"), (only, rows, "row")):
        for name in given or ():
            if name not in have:
                raise ValueError(f"{grid} has no {what} {name!r}; its {what}s: {', '.join(have)}")
    picked = [c for c in cells if (not optimizers or c.config.optimizer in optimizers)
              and (not only or row_of(c) in only)]
    o_rank = {n: i for i, n in enumerate(optimizers or ())}
    r_rank = {n: i for i, n in enumerate(only or ())}
    # Stable: cells tied on every key the caller gave keep the grid's own order.
    return sorted(picked, key=lambda c: (c.config.seed, o_rank.get(c.config.optimizer, 0),
                                         r_rank.get(row_of(c), 0)))


def _bf16_name(cell: Cell, out: Path) -> Cell:
    """``cell`` renamed ``<row>-bf16/<seed>``, its folder and tag with it."""
    row, sep, seed = cell.name.rpartition("/")
    name = f"{row}-bf16{sep}{seed}" if sep else f"{cell.name}-bf16"
    cell.config.out = str(out / name)
    cell.config.tag = name.rsplit("/", 1)[0] if sep else name
    return Cell(name, cell.config)


def _table2(out: Path, base: dict, seeds: int, init: str | None) -> list[Cell]:
    cells = []
    for s in range(seeds):
        for name, kw in TABLE2_INITS.items():
            for opt in ("sgd", "adam"):
                cells.append(_cell(out, f"{name}-{opt}/s{s}", base, optimizer=opt, seed=s, **kw))
    return cells


def _table3(out: Path, base: dict, seeds: int, init: str | None) -> list[Cell]:
    from .models import PaperNet, matching_width

    cells = []
    for dataset, classes in (("cifar10", 10), ("cifar100", 100)):
        if dataset == "cifar100" and not _has_cifar100(base["data"]):
            continue  # documented: CIFAR-100 rows appear where its copy is present
        matched = matching_width(PaperNet(num_classes=classes, gated=True), num_classes=classes)
        # Plain vanilla is the reference; "x3" is the paper's row, "matched" has the gated net's parameter count.
        rows = {"vanilla": dict(), "gated": dict(gated=True), "vanilla-x3": dict(width=3.0),
                "vanilla-matched": dict(width=matched)}
        for s in range(seeds):
            for row, kw in rows.items():
                cells.append(_cell(out, f"{dataset}-{row}/s{s}", base, dataset=dataset, seed=s,
                                   init=init or "he", optimizer="adam", **kw))
    return cells


def _has_cifar100(data: str) -> bool:
    p = Path(data)
    return (p / "cifar-100-python").is_dir() or (p / "cifar-100-python.tar.gz").is_file()


def _ablation(out: Path, base: dict, seeds: int, init: str | None, steps: int = 10_000) -> list[Cell]:
    cells = []
    for s in range(seeds):
        for lam in (0, 1, 10, 100):
            cells.append(_cell(out, f"joint-lambda{lam}/s{s}", base, init="kmeans-paper", optimizer="sgd", seed=s,
                               init_options=dict(cosine_weight=float(lam), steps=steps)))
        cells.append(_cell(out, f"layerwise/s{s}", base, init="kmeans-layerwise", optimizer="sgd", seed=s,
                           init_options=dict(scale="unit")))
    return cells


def _study(out: Path, base: dict, seeds: int, init: str | None) -> list[Cell]:
    cells = []
    for s in range(seeds):
        for name, kw in STUDY_VARIANTS.items():
            for opt in ("sgd", "adam"):
                cells.append(_cell(out, f"{name}/{opt}-s{s}", {**base, **SCHEDULES["study"]}, optimizer=opt, seed=s, **kw))
    return cells


def _screen(out: Path, base: dict, seeds: int, init: str | None) -> list[Cell]:
    screen = dict(epochs=1, halve_at=1.0, eval_every=98, log_every=39, checkpoint_every=390)
    return [_cell(out, name, {**base, **screen}, optimizer="sgd", seed=0, **kw) for name, kw in SCREEN_VARIANTS.items()]


GRIDS = {"table2": _table2, "table3": _table3, "ablation": _ablation, "study": _study, "screen": _screen}


def cell_command(cell: Cell, python: str | None = None) -> list[str]:
    """The ``kmeansinit train`` command line that runs (or resumes) ``cell``."""
    exe = [python or sys.executable, "-m", "kmeansinit", "train"]
    if (cell.out / "config.json").exists():
        return exe + ["--resume", str(cell.out), "--quiet"]
    cfg, default = dataclasses.asdict(cell.config), dataclasses.asdict(TrainConfig())
    # The CLI fills a zoo model's recipe options it is not given: spell them all out.
    spelled = set(RECIPES["zoo"]) if cfg["model"] != "paper" else set()
    args = []
    for key, value in cfg.items():
        if value == default[key] and key != "out" and key not in spelled:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "init_options":
            for k, v in value.items():
                args += ["--init-option", f"{k}={json.dumps(v)}"]
        elif key in ("flip", "channels_last", "batch_norm"):
            args.append("--no-" + key.replace("_", "-"))
        elif key == "nesterov":
            args.append("--nesterov" if value else "--no-nesterov")
        elif isinstance(value, bool):
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return exe + args + ["--quiet"]


def _init_group(cell: Cell) -> str:
    """What decides a cell's init (its optimizer and schedule do not)."""
    c = cell.config
    return json.dumps([c.dataset, c.data, c.gated, c.width, c.init, c.init_options, c.init_images, c.init_split,
                       c.seed, c.init_cache], sort_keys=True, default=str)


def _checkpoint_step(cell: Cell) -> int | None:
    """The step a started cell resumes from (0 when it has none yet); None when its checkpoint cannot
    be read (the cell then runs alone, where ``train`` names the problem)."""
    from .train import CKPT, RunError, load_state

    path = cell.out / CKPT
    if not path.exists():
        return 0
    try:
        return int(load_state(path)["step"])
    except (RunError, KeyError, TypeError, ValueError):
        return None


def plan_jobs(todo: list[Cell], stack: int = 1) -> list[list[Cell]]:
    """The grid's jobs in order: each a list of cells trained together. With ``stack`` > 1, cells that
    share :data:`~kmeansinit.train_stacked.STACK_FIELDS` and their resume step go up to ``stack`` to a job."""
    if stack < 1:
        raise ValueError(f"stack must be >= 1, got {stack}")
    if stack == 1:
        return [[c] for c in todo]
    from .train_stacked import stack_key

    groups: dict = {}
    for c in todo:
        step = _checkpoint_step(c)
        key = (stack_key(c.config), step) if step is not None else ("alone", c.name)
        groups.setdefault(key, []).append(c)
    jobs = []
    for members in groups.values():
        jobs += [members[i:i + stack] for i in range(0, len(members), stack)]
    order = {c.name: i for i, c in enumerate(todo)}
    return sorted(jobs, key=lambda job: order[job[0].name])


def job_command(job: list[Cell], python: str | None = None, threads: int = 0) -> list[str]:
    """A cell's ``kmeansinit train`` command, or for several cells one ``kmeansinit stack`` command."""
    if len(job) == 1:
        cmd = cell_command(job[0], python)
        return cmd + (["--threads", str(threads)] if threads and "--resume" not in cmd else [])
    exe = [python or sys.executable, "-m", "kmeansinit", "stack"]
    for c in job:
        exe += ["--cell", shlex.join([a for a in cell_command(c, python)[4:] if a != "--quiet"])]
    return exe + (["--threads", str(threads)] if threads else []) + ["--quiet"]


def run_grid(cells: list[Cell], *, jobs: int = 1, dry_run: bool = False, log=print, poll: float = 1.0,
             stack: int = 1) -> list[Cell]:
    """Run every unfinished cell (``jobs`` processes at a time, each training one cell or, with ``stack``,
    up to that many cells as one stacked model); return the cells that failed."""
    stale = {c.name: why for c in cells if (why := c.stale())}
    stale_cells = [c for c in cells if c.name in stale]  # reported as failed: never run, never "done"
    for c in stale_cells:
        log(f"# stale: {c.name}: {stale[c.name]}; move that folder away to run this cell")
    todo = [c for c in cells if not c.done and c.name not in stale]
    plan = plan_jobs(todo, stack)
    if dry_run:
        first = {job[0].name: job for job in plan}
        for c in cells:
            if c.name in stale:
                continue
            if c.done:
                log("# done: " + shlex.join(cell_command(c, "python")))
            elif c.name in first:
                log(shlex.join(job_command(first[c.name], "python")))
        return stale_cells
    stacked = sum(len(j) for j in plan if len(j) > 1)
    log(f"{len(cells)} cells, {len(cells) - len(todo) - len(stale)} finished, {len(todo)} to run ({jobs} at a time"
        + (f"; {len(stale)} stale, not run" if stale else "")
        + (f"; {stacked} of them in {sum(len(j) > 1 for j in plan)} stacks" if stacked else "") + ")")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    lock, say = threading.Lock(), log

    def log(msg):  # the cells' threads log too: one whole line at a time
        with lock:
            say(msg)

    failed = list(stale_cells)
    live: dict[int, subprocess.Popen] = {}
    stop = {"signal": 0}

    def forward(signum, frame):
        # Ctrl-C or a scheduler's SIGTERM: each running cell checkpoints its current step and exits;
        # no new cell starts. (Without this, SIGTERM would end the runner and orphan its cells.)
        stop["signal"] = signum
        for proc in list(live.values()):
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}

    def one(item):
        i, job = item
        for c in job:
            c.out.mkdir(parents=True, exist_ok=True)
        cmd = job_command(job, threads=threads)
        t = time.perf_counter()
        name = job[0].name if len(job) == 1 else f"stack of {len(job)} ({', '.join(c.name for c in job)})"
        log(f"[{i + 1}/{len(plan)}] {name}: {'resuming' if (job[0].out / 'config.json').exists() else 'starting'}")
        files = [open(c.out / "train.log", "a") for c in job]
        try:
            # A cell writes its train.log itself; a stack's output is copied into every member's.
            proc = subprocess.Popen(cmd, stdout=files[0] if len(job) == 1 else subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            live[proc.pid] = proc
            for line in proc.stdout or ():
                for f in files:
                    f.write(line)
                    f.flush()
            rc = proc.wait()
            live.pop(proc.pid, None)
        finally:
            for f in files:
                f.close()
        if stop["signal"]:
            log(f"[{i + 1}/{len(plan)}] {name}: stopped (checkpoint saved; rerun the grid to resume)")
            return
        # A stack's exit code covers all its cells: the failed ones are those without a final result
        # (a diverged cell counts, as a diverged run alone does).
        bad = [c for c in job if not finished(c.out)] if len(job) > 1 else ([] if rc == 0 else job)
        if bad or rc != 0:
            failed.extend(bad)
            tail = (job[0].out / "train.log").read_text().strip().splitlines()[-1:] or ["?"]
            log(f"[{i + 1}/{len(plan)}] {name}: FAILED (exit {rc}){' for ' + ', '.join(c.name for c in bad) if len(job) > 1 else ''}: {tail[0]}")
        else:
            log(f"[{i + 1}/{len(plan)}] {name}: done in {time.perf_counter() - t:.0f}s")

    # Cells that share an init (the SGD and Adam cells of one init and seed) are not started while
    # another of them is still computing it: the second would only wait on the init cache's lock.
    pending, running = list(enumerate(plan)), {}
    try:
        _schedule(pending, running, jobs, one, poll, stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if stop["signal"]:
        raise Interrupted(stop["signal"])
    return failed


def _schedule(pending, running, jobs, one, poll, stop) -> None:
    while (pending and not stop["signal"]) or running:
        for t in [t for t in running if not t.is_alive()]:
            del running[t]
        busy = {_init_group(c) for job in running.values() for c in job if not (c.out / "init.pt").exists()}
        while len(running) < jobs and not stop["signal"]:
            ready = next((item for item in pending if not {_init_group(c) for c in item[1]} & busy), None)
            if ready is None:
                break
            pending.remove(ready)
            t = threading.Thread(target=one, args=(ready,))
            t.start()
            running[t] = ready[1]
            busy |= {_init_group(c) for c in ready[1]}
        time.sleep(poll)
