"""Reports from run folders only (config.json, metrics.jsonl, init_report.json, init.pt, final.pt).

``write_report(dir)`` writes ``report.md``, ``curves.png``, ``losses.png`` and ``filters.png`` into ``dir``. It never
imports the trainer: a folder copied from a cluster is enough.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "collect", "summarize", "write_report", "PAPER"]

#: The paper's own final test accuracies (Table 2, CIFAR-10, 75,000 iterations, SGD and Adam), by
#: cell row and optimizer. Rows not listed (our own) are left blank rather than guessed.
PAPER = {"normal-sgd": 0.697, "xavier-sgd": 0.751, "he-sgd": 0.740, "kmeans-paper-sgd": 0.767,
         "normal-adam": 0.801, "xavier-adam": 0.806, "he-adam": 0.811, "kmeans-paper-adam": 0.803}

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class Run:
    path: Path
    group: str
    seed: str
    config: dict
    rows: list[dict]
    init: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """final.pt written, or (a folder kept without weights) the final evaluation at the last step."""
        if (self.path / "final.pt").exists():
            return True
        last = self.config.get("resolved_iterations")
        return bool(self.rows) and last is not None and self.rows[-1]["step"] == last and "test_acc" in self.rows[-1]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if "test_acc" in r]


_SEED = re.compile(r"(?:^|[-/])s(\d+)$")


def _group_of(rel: str) -> tuple[str, str]:
    m = _SEED.search(rel)
    if not m:
        return rel, "0"
    return rel[: m.start()], m.group(1)


def collect(root: str | Path) -> list[Run]:
    """Every run folder (one with config.json) under ``root``, grouped by name with the seed stripped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    runs = []
    for cfg_path in sorted(root.rglob("config.json")):
        if "init-cache" in cfg_path.parts:
            continue
        folder = cfg_path.parent
        rel = folder.relative_to(root).as_posix() if folder != root else folder.name
        group, seed = _group_of(rel)
        rows = []
        mpath = folder / "metrics.jsonl"
        if mpath.exists():
            for line in mpath.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill or damaged: the others still count
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
        try:
            config = json.loads(cfg_path.read_text())
            init = json.loads((folder / "init_report.json").read_text()) if (folder / "init_report.json").exists() else {}
        except (ValueError, UnicodeDecodeError) as e:
            import sys

            print(f"kmeansinit report: skipping {folder}: corrupt JSON ({e})", file=sys.stderr)
            continue
        runs.append(Run(folder, group, seed, config, rows, init))
    return runs


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _nearest(steps, step: int):
    """The evaluation step closest to ``step`` (ties to the later one)."""
    return min(steps, key=lambda s: (abs(s - step), -s)) if steps else None


def _acc_at(run: Run, step: int, within: int | None = None) -> float | None:
    """Test accuracy at the evaluation closest to ``step``; None when there is none within ``within`` steps."""
    at = _nearest([r["step"] for r in run.evals], step)
    if at is None or (within is not None and abs(at - step) > within):
        return None
    return next((r["test_acc"] for r in run.evals if r["step"] == at), None)


def _first_reach(run: Run, level: float) -> tuple[int | None, float | None]:
    for r in run.evals:
        if r["test_acc"] >= level:
            return r["step"], r["wall"]
    return None, None


def summarize(runs: list[Run]) -> dict[str, dict]:
    """Per group: final accuracy/loss (mean, sd, n), steps and seconds to each accuracy threshold."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.evals:
            groups.setdefault(r.group, []).append(r)
    out = {}
    for g, rs in sorted(groups.items()):
        # Final numbers come from finished runs only; a running one still counts in the curves.
        done = [r for r in rs if r.finished] or rs
        last = [r.evals[-1] for r in done]
        acc, acc_sd = _mean_sd([x["test_acc"] for x in last])
        loss, loss_sd = _mean_sd([x["test_loss"] for x in last])
        # Validation accuracy at the final evaluation (runs with --val): what a choice is made on.
        val, val_sd = _mean_sd([x.get("val_acc") for x in last])
        per_epoch = None
        cfg = rs[0].config
        if "resolved_iterations" in cfg and rs[0].rows:
            per_epoch = round(rs[0].rows[-1]["step"] / rs[0].rows[-1]["epoch"]) if rs[0].rows[-1]["epoch"] else None
        reach = {}
        for level in THRESHOLDS:
            hits = [_first_reach(r, level) for r in rs]
            steps = [h[0] for h in hits]
            reach[level] = dict(
                steps=statistics.fmean(steps) if all(s is not None for s in steps) else None,
                wall=statistics.fmean([h[1] for h in hits]) if all(s is not None for s in steps) else None,
                reached=sum(s is not None for s in steps),
            )
        epochs = {}
        if per_epoch:
            for e in (1, 2, 3):
                # Only an evaluation within a tenth of an epoch of epoch e stands for it: cells evaluated
                # every 1,000 steps (2.6 epochs) would otherwise show the same figure "at 1 and 3 epochs".
                vals = [_acc_at(r, e * per_epoch, within=max(1, per_epoch // 10)) for r in done]
                if vals and all(v is not None for v in vals):
                    epochs[e] = _mean_sd(vals)
        out[g] = dict(n=len(rs), finished=sum(r.finished for r in rs), acc=acc, acc_sd=acc_sd, val=val, val_sd=val_sd, loss=loss,
                      loss_sd=loss_sd, steps=last[0]["step"], reach=reach, epochs=epochs, per_epoch=per_epoch,
                      init=cfg.get("init"), optimizer=cfg.get("optimizer"),
                      init_seconds=_mean_sd([r.init.get("seconds", math.nan) for r in rs])[0],
                      train_seconds=_mean_sd([x.get("wall", math.nan) for x in last])[0], params=_params(rs[0].path))
    return out


def _params(folder: Path) -> int | None:
    """Trainable parameter count of a run's model, read from its saved init weights, or from its final
    weights in a finished folder kept without them (BN buffers excluded)."""
    path = next((folder / n for n in ("init.pt", "final.pt") if (folder / n).exists()), None)
    if path is None:
        return None
    state = _safe_load(path)
    if state is None:
        return None
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in state.items() if not k.endswith(buffers))


def _safe_load(path: Path):
    """Tensors from a run folder's .pt file (``weights_only``: a planted pickle is refused, never run);
    None, with one line on stderr, for a file that is refused or unreadable."""
    import sys

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        print(f"kmeansinit report: skipping {path}: not a plain tensor file ({first})", file=sys.stderr)
        return None


def _fmt(x, sd=None, pct=True):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
    return f"{x:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def report_markdown(root: Path, runs: list[Run], summary: dict[str, dict], title: str | None = None) -> str:
    cfg = runs[0].config if runs else {}
    sched = (f"{cfg.get('resolved_iterations')} iterations, batch {cfg.get('batch_size')}, lr {cfg.get('lr')} "
             f"halved after {cfg.get('halve_at', 2 / 3):.3g} of the run, weight decay {cfg.get('weight_decay')}")
    lines = [f"# {title or 'Results: ' + root.name}", "",
             f"Schedule: {sched}. Test accuracy in %, mean ± sd over seeds (n = seeds; final numbers over "
             "finished runs only). 'Paper' quotes the paper (75,000 iterations) only where we have its number.", ""]
    has_epochs = any(s["epochs"] for s in summary.values())
    has_val = any(not math.isnan(s["val"]) for s in summary.values())
    if has_val:
        lines += ["'Final val acc': on the validation split the runs held out of training (`--val`), "
                        "the one to choose on; test accuracy is for the final numbers.", ""]
    head = "| cell | n |" + (" final val acc |" if has_val else "") + " final test acc | final test loss |"
    sep = "|---|---|" + ("---|" if has_val else "") + "---|---|"
    if has_epochs:
        head += " acc @1 ep | acc @3 ep |"
        sep += "---|---|"
    # Parameters only where the cells' models differ (table3); training seconds exclude the init.
    models = {s["params"] for s in summary.values()}
    if len(models) > 1:
        head += " params |"
        sep += "---|"
    head += " paper | init s | train s |"
    sep += "---|---|---|"
    lines += [head, sep]
    for g, s in summary.items():
        done = "" if s["finished"] == s["n"] else f" ({s['n'] - s['finished']} running)"
        one = s["finished"] < 2  # no spread from a single run
        row = f"| {g} | {s['n']}{done} |"
        if has_val:
            row += f" {_fmt(s['val'], None if one else s['val_sd'])} |"
        row += (f" {_fmt(s['acc'], None if one else s['acc_sd'])} | "
               f"{_fmt(s['loss'], None if one else s['loss_sd'], pct=False)} |")
        if has_epochs:
            row += "".join(f" {_fmt(s['epochs'][e][0], None if one else s['epochs'][e][1]) if e in s['epochs'] else '–'} |"
                           for e in (1, 3))
        if len(models) > 1:
            row += f" {s['params']:,} |" if s["params"] else " – |"
        paper = PAPER.get(g.removesuffix("-bf16"))  # the paper's number, whichever precision ran it
        row += f" {_fmt(paper) if paper else ''} | {s['init_seconds']:.1f} | {s['train_seconds']:.0f} |"
        lines.append(row)
    lines += ["", "## Expedited training: iterations (and seconds) to first reach a test accuracy", "",
              "Mean over seeds; '–' where some seed never reached it.", "",
              "| cell | " + " | ".join(f"{int(100 * t)}%" for t in THRESHOLDS) + " |",
              "|---|" + "---|" * len(THRESHOLDS)]
    for g, s in summary.items():
        cells = []
        for t in THRESHOLDS:
            r = s["reach"][t]
            cells.append(f"{r['steps']:.0f} ({r['wall']:.0f}s)" if r["steps"] is not None else "–")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += [""] + versus_he(runs)
    lines += ["![curves](curves.png)", ""]
    if (root / "losses.png").exists():
        lines += ["![training and test loss](losses.png)", ""]
    if (root / "filters.png").exists():
        lines += ["![first-layer filters](filters.png)", ""]
    return "\n".join(lines) + "\n"


def _mean_evals(rs: list[Run]) -> dict[int, float]:
    steps, accs = _mean_curve(rs, "test_acc")
    return dict(zip(steps, accs))


def _crossing(curve: dict[int, float], level: float) -> float | None:
    """First step at which the piecewise-linear curve (from step 0 at chance, 0.1) reaches ``level``."""
    prev_s, prev_v = 0, 0.1
    for s in sorted(curve):
        v = curve[s]
        if v >= level:
            if v == prev_v:
                return float(s)
            return prev_s + (level - prev_v) / (v - prev_v) * (s - prev_s)
        prev_s, prev_v = s, v
    return None


def versus_he(runs: list[Run]) -> list[str]:
    """Each group against He with the same optimizer, at every evaluation both have (mean over seeds),
    and the iterations each needs to reach He's accuracy after one epoch of SGD."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.evals:
            groups.setdefault(r.group, []).append(r)
    he = {rs[0].config.get("optimizer", "sgd"): rs for g, rs in groups.items() if _init_of(g) == "he"}
    if not he:
        return []
    ref_sgd = he.get("sgd")
    target = None
    if ref_sgd:
        per_epoch = round(ref_sgd[0].rows[-1]["step"] / ref_sgd[0].rows[-1]["epoch"])
        curve = _mean_evals(ref_sgd)
        at = _nearest(list(curve), per_epoch)
        target = (curve[at], at) if at is not None else None
    lines = ["## Against He (mean over seeds)", ""]
    if target:
        lines += [f"He reaches {100 * target[0]:.1f}% test accuracy after one epoch of SGD (step {target[1]}). "
                  "'steps to He@1ep' is where a cell's mean accuracy curve first reaches that, interpolated "
                  "linearly between the two evaluations around the crossing; 'ratio' divides by He's step.", ""]
    lines += ["| cell | evaluations | never below He | worst gap (points) | steps to He@1ep | ratio |", "|---|---|---|---|---|---|"]
    for g, rs in sorted(groups.items()):
        opt = rs[0].config.get("optimizer", "sgd")
        if opt not in he or _init_of(g) == "he":
            continue
        mine, ref = _mean_evals(rs), _mean_evals(he[opt])
        common = sorted(set(mine) & set(ref))
        gaps = [100 * (mine[s] - ref[s]) for s in common]
        reach, ratio = "–", "–"
        if target and opt == "sgd":
            hit = _crossing(mine, target[0])
            if hit is not None:
                reach, ratio = f"{hit:.0f}", f"{hit / target[1]:.2f}"
        never = "yes" if gaps and min(gaps) >= 0 else "no"
        lines.append(f"| {g} | {len(common)} | {never} | {min(gaps):+.1f} | {reach} | {ratio} |" if gaps else f"| {g} | 0 | – | – | – | – |")
    return lines + [""]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'kmeansinit[plot]'") from e
    return plt


def plot_curves(runs: list[Run], path: Path) -> None:
    """Training loss and test accuracy against iteration, mean over seeds: colour per init, style per optimizer."""
    plt = _pyplot()
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    colour = _init_colours(plt, groups)
    style = {"sgd": "-", "adam": "--"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for g, rs in sorted(groups.items()):
        opt = rs[0].config.get("optimizer", "sgd")
        kw = dict(color=colour[_init_of(g)], linestyle=style.get(opt, ":"), label=g, linewidth=1.6, alpha=_alpha(g, groups))
        steps, loss = _mean_curve(rs, "train_loss", all_rows=True)
        if steps:
            a1.plot(steps, loss, **kw)
        steps, acc = _mean_curve(rs, "test_acc")
        if steps:
            a2.plot(steps, [100 * a for a in acc], marker=".", markersize=3, **kw)
    a1.set(xlabel="iteration", ylabel="training loss", title="Training loss")
    a2.set(xlabel="iteration", ylabel="test accuracy (%)", title="Test accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(runs: list[Run], path: Path) -> bool:
    """Training loss (solid) and test loss (dashed, at each evaluation) against iteration, mean over seeds,
    one panel per optimizer: where the two part, the net overfits (the paper's claim for k-means + Adam).
    The training loss is the running mean over each logging interval's augmented batches. False (no
    file) when no run has a test loss."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if any("test_loss" in e for e in r.evals):
            groups.setdefault(r.group, []).append(r)
    if not groups:
        return False
    plt = _pyplot()
    opts = sorted({rs[0].config.get("optimizer", "sgd") for rs in groups.values()}, key=lambda o: (o != "sgd", o))
    colour = _init_colours(plt, groups)
    fig, axes = plt.subplots(1, len(opts), figsize=(6.5 * len(opts), 4.8), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for g, rs in sorted(groups.items()):
            if rs[0].config.get("optimizer", "sgd") != opt:
                continue
            c, a = colour[_init_of(g)], _alpha(g, groups)
            steps, loss = _mean_curve(rs, "train_loss", all_rows=True)
            if steps:
                ax.plot(steps, loss, color=c, alpha=a, linewidth=1.4, label=f"{g} train")
            steps, loss = _mean_curve(rs, "test_loss")
            if steps:
                ax.plot(steps, loss, color=c, alpha=a, linewidth=1.4, linestyle="--", marker=".", markersize=3, label=f"{g} test")
        ax.set(xlabel="iteration", ylabel="cross-entropy", title=f"{opt.upper()}: training (solid) and test (dashed) loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _init_colours(plt, groups) -> dict:
    """One colour per init (both optimizers and precisions of an init share it), in sorted order."""
    cmap = plt.get_cmap("tab10")
    return {k: cmap(i % 10) for i, k in enumerate(sorted({_init_of(g) for g in groups}))}


def _alpha(group: str, groups) -> float:
    """Faint for an fp32 cell whose bf16 twin is in the same plot (they share a colour), full otherwise."""
    name = group.split("/")[0]
    return 0.4 if not name.endswith("-bf16") and f"{name}-bf16" in groups else 1.0


def _init_of(group: str) -> str:
    g = group.split("/")[0].removesuffix("-bf16")  # a bf16 cell keeps its init's colour
    for opt in ("-sgd", "-adam"):
        if g.endswith(opt):
            return g[: -len(opt)]
    return g


def _mean_curve(rs: list[Run], key: str, all_rows: bool = False):
    def rows(run):
        if not all_rows:
            return run.evals
        # Rows written at an evaluation between two log points average only a few steps: skip them.
        every = run.config.get("log_every", 1)
        return [r for r in run.rows if r["step"] % every == 0]

    per = [{r["step"]: r[key] for r in rows(run) if key in r} for run in rs]
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return common, [statistics.fmean(p[s] for p in per) for s in common]


def _variant(run: Run) -> str:
    opts = run.config.get("init_options") or {}
    return run.config["init"] + "".join(f", {k}={v}" for k, v in sorted(opts.items()))


def plot_filters(runs: list[Run], path: Path) -> bool:
    """First-layer filters, each normalized on its own: after k-means init, after He init, after training."""
    import torch

    plt = _pyplot()
    # One k-means init per distinct variant (init and options): the paper's and ours side by side.
    variants: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: (r.seed, r.config.get("optimizer") != "sgd", r.group)):
        if str(r.config.get("init", "")).startswith("kmeans") and (r.path / "init.pt").exists():
            key = json.dumps([r.config["init"], r.config.get("init_options", {})], sort_keys=True)
            variants.setdefault(key, r)
    kms = list(variants.values())
    he = next((r for r in runs if r.config.get("init") == "he" and (r.path / "init.pt").exists()), None)
    panels = [(f"after k-means init ({_variant(km)}, no labels)", km.path / "init.pt") for km in kms]
    if he:
        panels.append(("after He init", he.path / "init.pt"))
    has_weights = lambda r: (r.path / "final.pt").exists()  # noqa: E731 (a finished run kept without weights has none)
    trained = [km for km in kms if has_weights(km)] or ([he] if he and has_weights(he) else [])
    panels += [(f"after training ({r.group}, seed {r.seed})", r.path / "final.pt") for r in trained]
    if not panels:
        return False
    panels = [(title, state) for title, p in panels if (state := _safe_load(p)) is not None]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.9 * len(panels) + 0.3), squeeze=False)
    for ax, (title, state) in zip(axes[:, 0], panels):
        key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
        w = state[key].float()
        tiles = []
        for f in w:
            f = f[:3] if f.shape[0] >= 3 else f[:1].expand(3, -1, -1)
            lo, hi = f.min(), f.max()
            f = (f - lo) / (hi - lo + 1e-12)
            tiles.append(torch.nn.functional.pad(f, (1, 1, 1, 1), value=1.0))
        per_row = min(len(tiles), 24)
        rows = [torch.cat(tiles[i:i + per_row], dim=2) for i in range(0, len(tiles), per_row)]
        if len(rows) > 1 and rows[-1].shape[2] != rows[0].shape[2]:
            rows[-1] = torch.nn.functional.pad(rows[-1], (0, rows[0].shape[2] - rows[-1].shape[2]), value=1.0)
        grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{title}: {key} {tuple(w.shape)}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def write_report(root: str | Path, title: str | None = None) -> Path:
    """Write report.md, curves.png and filters.png for the runs under ``root``; return report.md's path."""
    root = Path(root)
    runs = collect(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run folders (config.json) found")
    summary = summarize(runs)
    plot_curves([r for r in runs if r.evals], root / "curves.png")
    if not plot_losses(runs, root / "losses.png"):
        (root / "losses.png").unlink(missing_ok=True)  # an older report's picture of other runs
    plot_filters(runs, root / "filters.png")
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    path = root / "report.md"
    path.write_text(report_markdown(root, runs, summary, title))
    return path
