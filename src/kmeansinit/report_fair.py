"""The fair-evidence report (``kmeansinit report runs/fair``): reads the run folders of
``kmeansinit reproduce fair`` only, and writes ``fair.md`` and ``lr_sweep.png`` beside them.

Per architecture and optimizer: the learning-rate sweep (validation accuracy at its end, each init's
chosen rate marked), and, for the final runs at each init's chosen rate, validation and test accuracy
at one epoch and at the end (mean ± sd and a 95% t-interval over seeds), the iterations and seconds
(init included) to a target validation accuracy, and the `kmeans` preset against the best baseline.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .report import _mean_sd, _pyplot, collect

__all__ = ["write_fair_report"]

#: The inits that are not k-means ones (fixup only where the grid has a residual net without BN).
BASELINES = ("he", "xavier", "lsuv", "whitening", "fixup")
# Controls and the k-means init whose per-layer filter norms each one takes (He's directions).
CONTROLS = {"he-kmeans-norm": "kmeans", "he-variance-norm": "kmeans-variance"}
# Two-sided 95% quantiles of Student's t by degrees of freedom (1..10); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def _t95(df: float) -> float:
    return _T95[int(df) - 1] if 1 <= df <= len(_T95) else 1.96


def _t_sf2(t: float, df: float, n: int = 4000) -> float:
    """Two-sided p-value of Student's t: 1 - integral of the t density over [-|t|, |t|] (Simpson)."""
    t = abs(t)
    if t == 0:
        return 1.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / n
    area = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return max(0.0, 1 - 2 * area * h / 3)


def _welch(a: dict, b: dict):
    """(difference of means, half-width of its 95% interval, two-sided p) by Welch's t; None without spread."""
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]) if a["n"] > 1 and b["n"] > 1 else 0.0
    if se <= 0:
        return diff, None, None
    df = se ** 4 / ((a["sd"] ** 2 / a["n"]) ** 2 / (a["n"] - 1) + (b["sd"] ** 2 / b["n"]) ** 2 / (b["n"] - 1))
    lo, hi = 0.0, 100.0  # the 97.5% quantile at this (fractional) df, so interval and p agree
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_sf2(mid, df, 400) > 0.05 else (lo, mid)
    return diff, hi * se, _t_sf2(diff / se, df)


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    m, sd = _mean_sd(xs)
    half = _t95(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    return dict(mean=m, sd=sd, n=len(xs), lo=m - half, hi=m + half)


def _fmt(s, ci=False, of=None):
    """mean ± sd [95% CI]; ``of``: the runs there are, so a value from fewer of them says how many."""
    if s is None:
        return "–"
    text = f"{100 * s['mean']:.1f}"
    if of is not None and s["n"] < of:
        text += f" ({s['n']} of {of})"
    if s["n"] > 1:
        text += f" ± {100 * s['sd']:.1f}"
        if ci:
            text += f" [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]"
    return text


def _at(rows, key, step, within: int):
    """``key`` at the row closest to ``step`` that has it, if that row is within ``within`` steps."""
    have = [r for r in rows if key in r and abs(r["step"] - step) <= within]
    if not have:
        return None
    return min(have, key=lambda r: (abs(r["step"] - step), -r["step"]))[key]


def _last(rows, key):
    """``key`` at the last row that has it (None if none does)."""
    return next((r[key] for r in reversed(rows) if key in r), None)


def _same_rate(a: float, b: float) -> bool:
    """Whether two learning rates are the same up to float rounding (rates are read back from folder
    names and configs, so exact equality is not safe); fair.py's _swept keeps the same tolerance."""
    return abs(a / b - 1) < 1e-6


def _diverged(run) -> bool:
    return (run.path / "diverged.json").exists()


def _sweep_table(runs) -> tuple[list[str], dict]:
    by: dict[str, dict[float, object]] = {}
    for r in runs:
        by.setdefault(r.path.parent.name, {})[r.config["lr"]] = r
    lrs = sorted({lr for v in by.values() for lr in v})
    lines = ["| init | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    curves = {}
    for init, cells in sorted(by.items()):
        accs = {}
        for lr, r in cells.items():
            if _diverged(r):
                accs[lr] = 0.0
            elif r.finished:
                accs[lr] = _last(r.rows, "val_acc")
        best = max((lr for lr, a in accs.items() if a is not None), key=lambda lr: (accs[lr], -lr), default=None)
        row = []
        for lr in lrs:
            if lr not in cells:
                row.append("")
            elif _diverged(cells[lr]):
                row.append("diverged")
            elif accs.get(lr) is None:
                row.append("running")
            else:
                row.append(("**" if lr == best else "") + f"{100 * accs[lr]:.1f}" + ("**" if lr == best else ""))
        lines.append(f"| {init} | " + " | ".join(row) + " |")
        curves[init] = {lr: a for lr, a in accs.items() if a is not None}
    return lines, curves


def _final_section(runs, also_at: tuple = (), what: str = "Final runs (each init at its chosen rate") -> list[str]:
    """``also_at``: epochs at which to give validation accuracy besides one epoch and the end (a
    setting trained longer than the one whose rates it borrows: that setting's budget)."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.path.parent.name, []).append(r)
    done = {g: [r for r in rs if r.finished] for g, rs in groups.items()}
    done = {g: rs for g, rs in done.items() if rs}
    if not done:
        return ["Final runs: none finished yet."]
    any_run = next(iter(done.values()))[0]
    per_epoch = any_run.config["test_every"] or round(any_run.rows[-1]["step"] / any_run.rows[-1]["epoch"])
    # The early column is one epoch of the full training set; with --labels that is many labelled epochs.
    early = f"{per_epoch} it" if any_run.config.get("labels") else "1 epoch"
    stats = {}
    for g, rs in done.items():
        stats[g] = dict(
            lr=rs[0].config["lr"], n=len(rs),
            val1=_stats([_at(r.rows, "val_acc", per_epoch, per_epoch // 20) for r in rs]),
            **{f"val@{e:g}": _stats([_at(r.rows, "val_acc", round(e * per_epoch), per_epoch // 20) for r in rs])
               for e in also_at},
            test1=_stats([_at(r.rows, "test_acc", per_epoch, per_epoch // 20) for r in rs]),
            val=_stats([_last(r.rows, "val_acc") for r in rs]),
            test=_stats([_last(r.rows, "test_acc") for r in rs]),
            init_s=statistics.fmean([r.init.get("seconds", 0.0) for r in rs]),
            runs=rs)
    # Target: the lowest final mean validation accuracy of any init, so every init reaches it.
    target = min(s["val"]["mean"] for s in stats.values())
    lines = [f"{what}; {per_epoch} iterations an epoch; target validation "
             f"accuracy {100 * target:.1f}%, the lowest final mean of any init):", "",
             f"| init | lr | seeds | val @{early} | test @{early} | "
             + "".join(f"val @{e:g} epochs | " for e in also_at)
             + "val @end | test @end (95% CI) | iterations to target | seconds to target (init incl.) |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(also_at)]
    for g, s in sorted(stats.items(), key=lambda kv: -kv[1]["val"]["mean"]):
        its, secs = [], []
        for r in s["runs"]:
            hit = next((x for x in r.rows if "val_acc" in x and x["val_acc"] >= target), None)
            its.append(hit["step"] if hit else None)
            secs.append(hit["wall"] + r.init.get("seconds", 0.0) if hit else None)
        it_txt = f"{statistics.fmean(its):.0f}" if all(i is not None for i in its) else f"{sum(i is not None for i in its)}/{len(its)} reached"
        s_txt = f"{statistics.fmean(secs):.0f}" if all(x is not None for x in secs) else "–"
        n = s["n"]
        lines.append(f"| {g} | {s['lr']:g} | {n} | {_fmt(s['val1'], of=n)} | {_fmt(s['test1'], of=n)} | "
                     + "".join(f"{_fmt(s[f'val@{e:g}'], of=n)} | " for e in also_at)
                     + f"{_fmt(s['val'], of=n)} | {_fmt(s['test'], ci=True, of=n)} | {it_txt} | {s_txt} |")
    base = [g for g in stats if g in BASELINES]
    for km in [g for g in sorted(stats, key=lambda g: (g != "kmeans", g)) if g.startswith("kmeans")] if base else []:
        whens = [(f"at {early}", "val1"), *((f"at {e:g} epochs", f"val@{e:g}") for e in also_at),
                 ("at the end", "val"), ("at the end, test", "test")]
        for when, key in whens:
            if stats[km][key] is None or any(stats[g][key] is None for g in base):
                continue  # a run too short to have that evaluation
            best = max(base, key=lambda g: stats[g][key]["mean"])
            for other, what in ((best, "the best baseline"), ("he", "He")):
                if other not in stats or (what == "He" and best == "he"):  # He is the best baseline: said once
                    continue
                label = f"`{km}` vs {what} {when}" + (f" ({other})" if what != "He" else "")
                lines += ["", _compare(label, stats[km][key], stats[other][key])]
    # Each direction-or-norm control against the init whose norms it borrows: a k-means init's gain that
    # its control shares comes from the norms, one it does not share from the k-means directions.
    for control, parent in CONTROLS.items():
        if control in stats and parent in stats:
            for when, key in (("at the end", "val"), ("at the end, test", "test")):
                lines += ["", _compare(f"`{control}` (He's directions at `{parent}`'s norms) vs `{parent}` {when}",
                                       stats[control][key], stats[parent][key])]
    return lines


def _rate_check_section(checks, finals, tuned=(), also_at: tuple = ()) -> list[str]:
    """Seed 0 of each init at its chosen rate (the final runs' s0) and at the rate-check factors of
    it: validation (test) accuracy at the end, the best validation per init in bold. Then, once every
    init's check is finished, each init over its seeds at its best rate of the check: the final runs
    where that is the chosen rate, else the rate-check run (seed 0) and the ``tuned`` runs."""
    chosen = {r.path.parent.name: r for r in finals if r.seed == "0"}
    by: dict[str, dict[float, object]] = {}
    for r in checks:
        init = r.path.parent.name
        if init in chosen:
            by.setdefault(init, {chosen[init].config["lr"]: chosen[init]})[r.config["lr"]] = r
    if not by:
        return ["Rate check: none of its inits has a final seed 0 to compare with."]
    factors = sorted({round(lr / chosen[i].config["lr"], 6) for i, cells in by.items() for lr in cells})
    lines = ["Rate check (seed 0, this budget): validation (test) accuracy % at the end at the chosen rate "
             "(x1) and its neighbours; **bold**: each init's best validation.", "",
             "| init | " + " | ".join(f"x{f:g}" for f in factors) + " |", "|---|" + "---|" * len(factors)]
    best_at = {}
    for init, cells in sorted(by.items()):
        base = chosen[init].config["lr"]
        end = {}
        for lr, r in cells.items():
            if _diverged(r):
                end[lr] = (0.0, 0.0)
            elif r.finished:
                end[lr] = (_last(r.rows, "val_acc"), _last(r.rows, "test_acc"))
        top = max(end, key=lambda lr: (end[lr][0], -lr), default=None)
        if top is not None and len(end) == len(cells):
            best_at[init] = (top, end[top])
        row = []
        for f in factors:
            lr = next((x for x in cells if abs(x / base - f) < 1e-6), None)
            if lr is None:
                row.append("")
            elif _diverged(cells[lr]):
                row.append(f"lr {lr:g}: diverged")
            elif lr not in end:
                row.append(f"lr {lr:g}: running")
            else:
                b = "**" if lr == top else ""
                row.append(f"lr {lr:g}: {b}{100 * end[lr][0]:.1f}{b} ({100 * end[lr][1]:.1f})")
        lines.append(f"| {init} | " + " | ".join(row) + " |")
    if best_at:
        lines += ["", "Seed 0, each init at its best rate of these (finished only): "
                  + ", ".join(f"{i} {100 * v[0]:.1f} validation ({100 * v[1]:.1f} test) at lr {lr:g}"
                              + ("" if _same_rate(lr, chosen[i].config["lr"]) else " (not the chosen rate)")
                              for i, (lr, v) in sorted(best_at.items(), key=lambda kv: -kv[1][1][0])) + "."]
    if best_at and len(best_at) == len(by):
        runs = []
        for init, (lr, _) in best_at.items():
            if _same_rate(lr, chosen[init].config["lr"]):
                runs += [r for r in finals if r.path.parent.name == init]
            else:
                runs += [r for r in (*checks, *tuned) if r.path.parent.name == init and _same_rate(r.config["lr"], lr)]
        lines += ["", "Each init at its best rate of the rate check, over its seeds (seed 0 from the check, "
                  "the others from tuned/; the final runs where the chosen rate stayed best):", ""]
        lines += _final_section(runs, also_at, what="At the rate check's best rates (each init at its best rate for this budget")
    return lines


def _compare(label: str, a: dict, b: dict) -> str:
    """One line: the difference of two inits' mean accuracies, its 95% interval and Welch's p."""
    diff, half, p = _welch(a, b)
    if half is None:
        return f"{label}: {100 * diff:+.1f} points (too few seeds for an interval)."
    verdict = "ahead of" if diff - half > 0 else "behind" if diff + half < 0 else "within the seed noise of"
    p_txt = f"p = {p:.3f}" if p >= 0.001 else "p < 0.001"
    return (f"{label}: {100 * diff:+.1f} points (95% CI of the difference [{100 * (diff - half):+.1f}, "
            f"{100 * (diff + half):+.1f}], Welch {p_txt}): {verdict} it.")


def write_fair_report(root: str | Path) -> Path:
    """Write ``fair.md`` and ``lr_sweep.png`` for a ``reproduce fair`` folder; return fair.md's path."""
    from .fair import FAIR_ARCHS  # here, not at the top: fair imports train and its torch stack

    root = Path(root)
    parts = sorted(d for d in root.iterdir() if d.is_dir() and (d / "sweep").is_dir()) if root.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"{root}: no <arch>-<optimizer>/sweep folders of `kmeansinit reproduce fair`")
    # Settings without a sweep of their own (``rates_from``), after those with one.
    parts += sorted(d for d in root.iterdir() if d.is_dir() and (d / "final").is_dir() and not (d / "sweep").is_dir())
    lines = [f"# Fair evidence: each init at its own best learning rate (`kmeansinit report {root}`)", ""]
    sweeps = {}
    for d in parts:
        lines += [f"## {d.name}", ""]
        also_at = ()
        if (d / "sweep").is_dir():
            lines += ["Learning-rate sweep: validation accuracy (%) at the end of one seed's run; "
                      "**bold**: the best finished rate (the one the final runs use once the sweep is complete).", ""]
            table, curves = _sweep_table(collect(d / "sweep"))
            sweeps[d.name] = curves
            lines += table + [""]
        else:
            name, opt = d.name.rsplit("-", 1)  # <arch>-<optimizer>
            src = FAIR_ARCHS[name].rates_from if name in FAIR_ARCHS else None
            lines += [f"No sweep of its own: each init at the rate the {src}-{opt} sweep chose for it."
                      if src else "No sweep folder: the final runs only.", ""]
            if src:  # the borrowed setting's own budget, for the comparison with its final runs
                also_at = (FAIR_ARCHS[src].final_epochs,)
        lines += (_final_section(collect(d / "final"), also_at) if (d / "final").is_dir() else ["Final runs: not started."]) + [""]
        if (d / "ratecheck").is_dir() and (d / "final").is_dir():
            tuned = collect(d / "tuned") if (d / "tuned").is_dir() else []
            lines += _rate_check_section(collect(d / "ratecheck"), collect(d / "final"), tuned, also_at) + [""]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    # One colour per init in every panel (each panel has the inits its sweep has run so far).
    names = sorted({init for curves in sweeps.values() for init in curves})
    colour = {init: f"C{i % 10}" for i, init in enumerate(names)}
    for ax, (name, curves) in zip(axes[0], sweeps.items()):
        for init, accs in sorted(curves.items()):
            if accs:
                xs = sorted(accs)
                ax.plot(xs, [100 * accs[x] for x in xs], marker="o", label=init, color=colour[init])
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "lr_sweep.png", dpi=110)
    plt.close(fig)
    lines.append("![learning-rate sweep](lr_sweep.png)")
    path = root / "fair.md"
    path.write_text("\n".join(lines) + "\n")
    return path
