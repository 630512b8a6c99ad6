"""docs/results/paper_schedule/norms.py: filter norms at the init and at the latest weights of each cell."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from kmeansinit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "results" / "paper_schedule" / "norms.py"


def _module():
    spec = importlib.util.spec_from_file_location("norms", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _state(scale: float) -> dict:
    # Two BN-fed layers whose every filter has norm `scale` and `2 * scale`, and a last layer (left out).
    a = torch.zeros(4, 3, 2, 2)
    a[:, 0, 0, 0] = scale
    b = torch.zeros(5, 4)
    b[:, 1] = -2 * scale
    return {"conv.weight": a, "bn.weight": torch.ones(4), "fc.weight": b, "head.weight": torch.full((10, 5), 7.0)}


def test_bn_fed_norms_are_per_filter_means_without_the_last_layer():
    torch.testing.assert_close(torch.tensor(_module().bn_fed_norms(_state(0.5))), torch.tensor([0.5, 1.0]))
    w = torch.randn(6, 3, 3, 3)
    got = _module().bn_fed_norms({"c.weight": w, "last.weight": torch.randn(2, 6)})
    torch.testing.assert_close(torch.tensor(got), torch.stack([f.pow(2).sum().sqrt() for f in w]).mean().reshape(1))


def _cell(runs: Path, name: str, init: dict, latest: dict, step: int | None) -> None:
    d = runs / name / "s0"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict(init=name.split("-")[0], optimizer=name.split("-")[1],
                                                   precision="bf16", seed=0)))
    torch.save(init, d / "init.pt")
    if step is None:
        torch.save(latest, d / "final.pt")
    else:
        torch.save({"model": latest, "step": step}, d / "checkpoint.pt")


def test_effective_step_is_relative_to_he_sgd_and_left_out_for_adam(tmp_path):
    _cell(tmp_path, "he-sgd-bf16", _state(1.0), _state(2.0), None)
    _cell(tmp_path, "normal-sgd-bf16", _state(0.01), _state(0.5), 3000)
    _cell(tmp_path, "he-adam-bf16", _state(1.0), _state(4.0), 1000)
    out = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in out.stdout.splitlines()[2:] if ln.startswith("| ")}
    geo = lambda s: math.sqrt(s * 2 * s)  # geometric mean of the two layers' norms
    assert rows["normal-sgd-bf16/s0"] == ["3,000", f"{geo(0.01):.3g} (init.pt)", f"{geo(0.5):.3g}",
                                          f"{(geo(2.0) / geo(0.5)) ** 2:.2f}"]
    assert rows["he-sgd-bf16/s0"][0] == "final (75,000)" and rows["he-sgd-bf16/s0"][3] == "1.00"
    assert rows["he-adam-bf16/s0"][3] == "–"


def test_into_writes_the_printed_table_under_the_norms_heading_only(tmp_path):
    """The Table 2 section has rows of the same cells: --into must leave it alone, and the footnote
    (which the document states in its own words) is printed only without --into."""
    runs = tmp_path / "runs"
    _cell(runs, "he-sgd-bf16", _state(1.0), _state(2.0), None)
    doc = tmp_path / "paper_schedule.md"
    head = "# T\n\n## Table 2 so far\n\n| cell | acc |\n|---|---|\n| he-sgd-bf16/s0 | 64.60 |\n\n"
    doc.write_text(head + "## Filter norms: the batch-norm effect at one fixed lr\n\n| old |\n|---|\n\nAfter.\n")
    printed = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs)], capture_output=True, text=True).stdout
    table = [ln for ln in printed.splitlines() if ln.startswith("|")]
    assert "filter norm: geometric mean" in printed and len(table) == 3
    out = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs), "--into", str(doc)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert doc.read_text() == (head + "## Filter norms: the batch-norm effect at one fixed lr\n\n"
                               + "\n".join(table) + "\n\nAfter.\n")
    assert "1 rows under" in out.stdout and "filter norm: geometric mean" not in out.stdout


def test_a_data_free_init_is_rebuilt_exactly_as_train_made_it(fake_cifar10, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(fake_cifar10), out=str(out), width=0.25, batch_size=8, iterations=4, eval_every=4,
                      log_every=2, checkpoint_every=2, init="xavier", init_images=16, threads=1)
    train(cfg, progress=False)
    saved = torch.load(out / "init.pt", weights_only=True)
    (out / "init.pt").unlink()
    final = torch.load(out / "final.pt", weights_only=True)
    state, source = _module().init_state(out, json.loads((out / "config.json").read_text()), final)
    assert source == "rebuilt"
    assert saved.keys() == state.keys()
    for k in saved:
        torch.testing.assert_close(state[k], saved[k], rtol=0, atol=0)


def test_a_missing_runs_folder_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode != 0 and "nope: no such folder" in out.stderr and "Traceback" not in out.stderr
