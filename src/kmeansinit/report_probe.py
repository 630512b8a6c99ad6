"""The linear-probe report (``kmeansinit report runs/probe``): reads probe folders only, laid out as
``<setting>/<init>/s<seed>/results.json`` (what ``kmeansinit probe --out`` wrote), and writes
``probe.md`` beside them.

Per setting: each init's validation and test accuracy over its seeds (mean ± sd, 95% t-interval),
its feature count, labels and chosen L2 weights; then the best k-means init (an init whose name starts
with ``kmeans``, best by mean validation accuracy) against the best other init, by Welch's t-test on
validation and on test.
"""
from __future__ import annotations

import json
from pathlib import Path

from .report_fair import _compare, _fmt, _stats

__all__ = ["write_probe_report", "is_probe_folder", "collect_probes"]


def is_probe_folder(root: str | Path) -> bool:
    """Whether ``root`` holds probe results (``<setting>/<init>/s<seed>/results.json``)."""
    return any(Path(root).glob("*/*/s*/results.json"))


def collect_probes(root: str | Path) -> dict:
    """{setting: {init: [results of each seed, in seed order]}} from ``root``; a results file that
    cannot be read is named in the error."""
    out: dict = {}
    for path in sorted(Path(root).glob("*/*/s*/results.json"), key=lambda p: (p.parts[-4], p.parts[-3], p.parts[-2])):
        try:
            res = json.loads(path.read_text())
            res["val_acc"], res["test_acc"]  # noqa: B018  (the two numbers the report needs)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a probe's results ({e})") from e
        setting, init = path.parts[-4], path.parts[-3]
        out.setdefault(setting, {}).setdefault(init, []).append(res)
    return out


def write_probe_report(root: str | Path) -> Path:
    """Write ``probe.md`` for a folder of probe runs; return its path."""
    root = Path(root)
    probes = collect_probes(root) if root.is_dir() else {}
    if not probes:
        raise FileNotFoundError(f"{root}: no <setting>/<init>/s<seed>/results.json of `kmeansinit probe`")
    lines = [f"# Linear probe of each init's features (`kmeansinit report {root}`)", "",
             "Each net initialized on unlabelled images and frozen, its BN statistics set on unlabelled "
             "images, a linear classifier fitted to one layer's features; the L2 weight chosen on validation. "
             "Accuracy %, mean ± sd over seeds [95% CI].", ""]
    for setting, inits in probes.items():
        first = next(iter(inits.values()))[0]
        lines += [f"## {setting}", "", f"{first.get('model', '?')}, {first.get('features', '?')} features, "
                  f"{first.get('labels', '?')} labelled images.", "",
                  "| init | seeds | validation | test (95% CI) | chosen L2 weights |", "|---|---|---|---|---|"]
        stats = {}
        for init, runs in sorted(inits.items(), key=lambda kv: -sum(r["val_acc"] for r in kv[1]) / len(kv[1])):
            v, t = _stats([r["val_acc"] for r in runs]), _stats([r["test_acc"] for r in runs])
            stats[init] = (v, t)
            wds = ", ".join(f"{r.get('weight_decay', float('nan')):g}" for r in runs)
            lines.append(f"| {init} | {len(runs)} | {_fmt(v)} | {_fmt(t, ci=True)} | {wds} |")
        km = [i for i in stats if i.startswith("kmeans")]
        other = [i for i in stats if not i.startswith("kmeans")]
        if km and other:
            k = max(km, key=lambda i: stats[i][0]["mean"])
            b = max(other, key=lambda i: stats[i][0]["mean"])
            lines += ["", _compare(f"`{k}` vs `{b}`, validation", stats[k][0], stats[b][0]),
                      "", _compare(f"`{k}` vs `{b}`, test", stats[k][1], stats[b][1])]
        lines.append("")
    path = root / "probe.md"
    path.write_text("\n".join(lines) + "\n")
    return path
