"""Filter norms of the paper-schedule cells, at the init and at the latest weights: the BN effect in numbers.

    python docs/results/paper_schedule/norms.py [--runs docs/results/paper_schedule/runs]

Every weight of PaperNet but the last layer's feeds a batch norm, so the loss does not change when a
filter is scaled: its gradient scales as 1/||w||, and an SGD step of fixed lr turns the filter's
direction by about lr * ||grad at unit norm|| / ||w||^2. An init with small filters therefore trains
with a larger effective step at the same lr, and the norms grow as training goes on (weight decay
1e-5 barely pulls them back), which is why one fixed lr is not a fair comparison of inits
(docs/results/fair.md). This prints, per cell, the geometric mean over those 10 BN-fed layers of the
mean filter norm, at the init and at the latest weights (``final.pt``, else ``checkpoint.pt``), and the
SGD cells' effective step 1/||w||^2 at the latest weights relative to the He/SGD (bf16) cell's.

Where the init weights come from: the cell's ``init.pt``; else the ``init.pt`` that was committed
while the cell ran (git history: finished cells keep only ``final.pt``); else, for the data-free inits
(normal, xavier, he), the init rebuilt as ``kmeansinit train`` builds it (same seed: same weights).
A cell with none of these shows "–". ``--into paper_schedule.md`` writes the table in place of the one
under "## Filter norms: the batch-norm effect at one fixed lr" (``--section``) instead of printing it.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA_FREE = {"normal", "xavier", "he"}


def _weights(state: dict) -> list[torch.Tensor]:
    """Every weight matrix or filter bank of a state dict, in the model's order (BN scales left out)."""
    return [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]


def bn_fed_norms(state: dict) -> list[float]:
    """Mean per-filter L2 norm of every weight matrix/filter bank but the last (the ones a BN follows)."""
    return [w.float().flatten(1).norm(dim=1).mean().item() for w in _weights(state)[:-1]]


def _geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _from_git(path: Path) -> dict | None:
    try:
        root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                   check=True, cwd=HERE).stdout.strip())
        rel = path.resolve().relative_to(root)
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(rel)], capture_output=True,
                                text=True, check=True, cwd=root).stdout.strip()
        if not commit:
            return None
        # The commit that removed it holds nothing: read the file from its parent.
        for rev in (f"{commit}:{rel}", f"{commit}~1:{rel}"):
            blob = subprocess.run(["git", "show", rev], capture_output=True, cwd=root)
            if blob.returncode == 0:
                return torch.load(io.BytesIO(blob.stdout), map_location="cpu", weights_only=True)
    except (subprocess.CalledProcessError, ValueError, FileNotFoundError):
        return None
    return None


def _rebuilt(cell: Path, latest: dict) -> dict:
    """The init as ``kmeansinit train`` makes it for a data-free init: same model, seed and options."""
    from kmeansinit import initialize_
    from kmeansinit.train import build_model, init_options, load_run_config

    cfg = load_run_config(cell)
    weights = _weights(latest)
    torch.manual_seed(cfg.seed)  # as train() does before building the model
    model = build_model(cfg, num_classes=weights[-1].shape[0], in_channels=weights[0].shape[1])
    initialize_(model, cfg.init, None, **init_options(cfg))
    return model.state_dict()


def init_state(cell: Path, cfg: dict, latest: dict) -> tuple[dict | None, str]:
    if (cell / "init.pt").exists():
        return torch.load(cell / "init.pt", map_location="cpu", weights_only=True), "init.pt"
    state = _from_git(cell / "init.pt")
    if state is not None:
        return state, "git"
    if cfg["init"] in DATA_FREE:
        return _rebuilt(cell, latest), "rebuilt"
    return None, "–"


def latest_state(cell: Path) -> tuple[dict | None, int | None]:
    if (cell / "final.pt").exists():
        return torch.load(cell / "final.pt", map_location="cpu", weights_only=True), None
    if (cell / "checkpoint.pt").exists():
        ck = torch.load(cell / "checkpoint.pt", map_location="cpu", weights_only=False)
        return ck["model"], ck["step"]
    return None, None


def main(argv=None) -> int:
    from _doc import add_into_args, emit  # this folder's helper: run as a script, its folder is on sys.path
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    add_into_args(p, "## Filter norms: the batch-norm effect at one fixed lr")
    a = p.parse_args(argv)
    if not a.runs.is_dir():
        sys.exit(f"{a.runs}: no such folder")
    rows = []
    for cfg_path in sorted(a.runs.glob("*/s*/config.json")):
        cell = cfg_path.parent
        cfg = json.loads(cfg_path.read_text())
        latest, step = latest_state(cell)
        if latest is None:
            continue
        init, source = init_state(cell, cfg, latest)
        rows.append((f"{cell.parent.name}/{cell.name}", cfg, step, init, source, _geo(bn_fed_norms(latest))))
    # SGD only: Adam divides the gradient by its own running size, so its step turns a filter by about
    # lr / ||w||, not lr / ||w||^2, and the two optimizers' cells are not on one scale.
    he = next((now for _, cfg, _, _, _, now in rows if cfg["init"] == "he" and cfg["optimizer"] == "sgd"
               and cfg.get("precision") == "bf16"), None)
    out = ["| cell | weights at | filter norm at init (source) | filter norm at latest | SGD effective step at latest, relative to He/SGD |",
           "|---|---|---|---|---|"]
    for name, cfg, step, init, source, now in rows:
        start = "–" if init is None else f"{_geo(bn_fed_norms(init)):.3g} ({source})"
        rel = "–" if he is None or cfg["optimizer"] != "sgd" else f"{(he / now) ** 2:.2f}"
        at = "final (75,000)" if step is None else f"{step:,}"
        out.append(f"| {name} | {at} | {start} | {now:.3g} | {rel} |")
    emit(out, a, footnote="filter norm: geometric mean over the 10 BN-fed layers of each layer's mean per-filter L2 norm; "
                          "SGD effective step: (He/SGD bf16's norm / the cell's norm)^2 at the latest weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
