import json
import math
import shlex
import subprocess
import sys

import pytest
import torch

from kmeansinit.cli import main
from kmeansinit.experiments import build_grid, cell_command, finished, run_grid
from kmeansinit.report import _alpha, collect, summarize, write_report

TINY = dict(width=0.25, batch_size=8, init_images=16, init_options=dict(steps=1), threads=1)


def tiny_table2(data, out, seeds=1):
    # The tiny schedule keeps the k-means cells cheap: 2 solver steps instead of the paper's 10,000.
    cells = build_grid("table2", out=out, schedule="tiny", seeds=seeds, data=str(data), extra=dict(width=0.25, batch_size=8, init_images=16))
    assert all(c.config.init_options.get("steps") == 2 for c in cells if c.config.init.startswith("kmeans"))
    return cells


def test_grid_shapes():
    t2 = build_grid("table2", out="g", seeds=2)
    assert len(t2) == 2 * 6 * 2 and {c.config.optimizer for c in t2} == {"sgd", "adam"}
    assert {c.config.init for c in t2} == {"normal", "xavier", "he", "kmeans-paper", "kmeans", "kmeans-variance"}
    ab = build_grid("ablation", out="g")
    assert sorted(c.config.init_options.get("cosine_weight", -1) for c in ab) == [-1, 0.0, 1.0, 10.0, 100.0]
    # The short schedule's joint inits take 2,000 steps; the paper schedule keeps the paper's 10,000.
    assert {c.config.init_options.get("steps") for c in ab if c.config.init == "kmeans-paper"} == {2000}
    paper = build_grid("ablation", out="g", schedule="paper")
    assert {c.config.init_options.get("steps") for c in paper if c.config.init == "kmeans-paper"} == {10_000}
    t3 = build_grid("table3", out="g", data="/nonexistent")
    assert [c.name for c in t3] == ["cifar10-vanilla/s0", "cifar10-gated/s0", "cifar10-vanilla-x3/s0",
                                    "cifar10-vanilla-matched/s0"]
    assert [c.config.width for c in t3][:3] == [1.0, 1.0, 3.0] and 1.6 < t3[3].config.width < 1.9
    assert build_grid("table3", out="g", extra=dict(iterations=600))[0].config.iterations == 600
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("table9", out="g")


def test_table3_includes_cifar100_when_present(fake_cifar100):
    t3 = build_grid("table3", out="g", data=str(fake_cifar100))
    assert any(c.config.dataset == "cifar100" for c in t3)


def test_grid_runs_skips_resumes_and_reports(fake_cifar10, tmp_path):
    out = tmp_path / "grid"
    # Five of the twelve cells (each is a subprocess): two that finish first, one to interrupt, and the
    # SGD and Adam cells of one k-means init.
    cells = [c for c in tiny_table2(fake_cifar10, out) if c.name in
             ("normal-sgd/s0", "normal-adam/s0", "he-adam/s0", "kmeans-paper-sgd/s0", "kmeans-paper-adam/s0")]
    assert run_grid(cells[:2], log=lambda *_: None) == []
    assert all(c.done for c in cells[:2])
    # A finished cell is skipped: its final weights are untouched by a second pass.
    stamp = (cells[0].out / "final.pt").stat().st_mtime_ns
    # An interrupted cell (config + checkpoint, no final) is resumed.
    victim = cells[2]
    subprocess.run(cell_command(victim) + ["--iterations", "8"], check=True, capture_output=True)
    (victim.out / "final.pt").unlink()
    logs = []
    assert run_grid(cells, log=logs.append) == []
    assert (cells[0].out / "final.pt").stat().st_mtime_ns == stamp
    assert any(f"{victim.name}: resuming" in l for l in logs)
    assert all(c.done for c in cells)
    # SGD and Adam cells of one k-means init share it through the cache.
    km = [c for c in cells if c.config.init == "kmeans-paper"]
    a, b = (torch.load(c.out / "init.pt") for c in km)
    assert all(torch.equal(a[k], b[k]) for k in a)

    path = write_report(out, title="tiny")
    text = path.read_text()
    summary = summarize(collect(out))
    for name, s in summary.items():
        runs = [r for r in collect(out) if r.group == name]
        assert s["acc"] == pytest.approx(runs[0].evals[-1]["test_acc"])
        assert f"| {name} | 1 | {100 * s['acc']:.1f} | {s['loss']:.3f} |" in text
    for png in ("curves.png", "losses.png", "filters.png"):
        assert f"]({png})" in text
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_dry_run_prints_commands_that_run(fake_cifar10, tmp_path, capsys):
    out = tmp_path / "g"
    cells = tiny_table2(fake_cifar10, out)
    lines = []
    run_grid(cells, dry_run=True, log=lines.append)
    assert len(lines) == len(cells) and all(l.startswith("python -m kmeansinit train") for l in lines)
    cmd = shlex.split(lines[4])
    cmd[0] = sys.executable
    subprocess.run(cmd, check=True, capture_output=True)
    assert cells[4].done


def test_reproduce_and_report_cli(fake_cifar10, tmp_path, capsys):
    assert main(["reproduce", "table2", "--schedule", "tiny", "--data", str(fake_cifar10), "--out",
                 str(tmp_path / "g"), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("kmeansinit train") == 12
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_seeds_zero_is_refused_not_taken_for_the_default(tmp_path, capsys):
    """--seeds 0 once ran the default (1, or 3 for fair): an explicit 0 is a one-line error."""
    for grid in (["table2"], ["fair", "--arch", "paper"]):
        assert main(["reproduce", *grid, "--seeds", "0", "--out", str(tmp_path / "g"), "--dry-run"]) == 2
        err = capsys.readouterr()
        assert err.err.strip() == "kmeansinit: error: seeds must be >= 1, got 0" and "kmeansinit train" not in err.out


def test_cells_sharing_an_init_start_after_it_is_done(fake_cifar10, tmp_path):
    # Two jobs, but the Adam cell of a k-means init waits until the SGD cell has finished that init.
    cells = [c for c in tiny_table2(fake_cifar10, tmp_path / "grid") if c.config.init == "kmeans-paper"]
    for c in cells:
        c.config.init_options = dict(steps=40)
    logs = []
    assert run_grid(cells, jobs=2, log=logs.append, poll=0.05) == []
    first, second = cells
    assert (second.out / "config.json").stat().st_mtime_ns >= (first.out / "init.pt").stat().st_mtime_ns
    a, b = (torch.load(c.out / "init.pt") for c in cells)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_concurrent_runs_share_one_cached_init(fake_cifar10, tmp_path):
    # Started together outside the grid runner: the init cache's lock makes the second load the first's init.
    cells = [c for c in tiny_table2(fake_cifar10, tmp_path / "grid") if c.config.init == "kmeans-paper"]
    procs = []
    for c in cells:
        c.config.init_options = dict(steps=40)
        c.out.mkdir(parents=True)
        procs.append(subprocess.Popen(cell_command(c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cache = list((tmp_path / "grid" / "init-cache").glob("kmeans-paper-*.pt"))
    assert len(cache) == 1
    a, b = (torch.load(c.out / "init.pt") for c in cells)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_counts_parameters_from_init_weights(tmp_path):
    from kmeansinit.models import PaperNet, count_parameters
    from kmeansinit.report import _params

    for kw in (dict(), dict(gated=True), dict(width=0.5, num_classes=100)):
        m = PaperNet(**kw)
        torch.save(m.state_dict(), tmp_path / "init.pt")
        assert _params(tmp_path) == count_parameters(m)
    assert _params(tmp_path / "missing") is None
    # A finished cell kept with final.pt only (the paper schedule's folders) still has its count.
    (tmp_path / "init.pt").unlink()
    m = PaperNet(gated=True)
    torch.save(m.state_dict(), tmp_path / "final.pt")
    assert _params(tmp_path) == count_parameters(m)


def test_report_quotes_the_papers_number_for_either_precision(tmp_path):
    for name, precision in (("he-sgd", "fp32"), ("he-adam-bf16", "bf16"), ("kmeans-variance-sgd-bf16", "bf16")):
        d = tmp_path / name / "s0"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(dict(init=name.split("-")[0] if name.startswith("he") else "kmeans-variance",
                                                       optimizer="adam" if "adam" in name else "sgd", seed=0,
                                                       precision=precision, iterations=10)))
        (d / "metrics.jsonl").write_text(json.dumps(dict(step=10, epoch=1.0, test_acc=0.5, test_loss=1.0, wall=1.0)) + "\n")
    rows = {}
    for line in write_report(tmp_path).read_text().splitlines():  # the first table's row of each cell
        if line.startswith(("| he-", "| kmeans-")):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert "| 74.0 |" in rows["he-sgd"] and "| 81.1 |" in rows["he-adam-bf16"]
    assert "74.0" not in rows["kmeans-variance-sgd-bf16"] and "81.1" not in rows["kmeans-variance-sgd-bf16"]


def test_cell_command_round_trips_zoo_configs(tmp_path):
    import dataclasses

    from kmeansinit.cli import build_parser, train_config_from_args
    from kmeansinit.experiments import Cell, cell_command
    from kmeansinit.train import TrainConfig

    # Values equal to the paper defaults must still be spelled out for a zoo model (the CLI would
    # otherwise fill its recipe's values).
    cfg = TrainConfig(model="resnet20", weight_decay=1e-5, nesterov=False, crop=0, lr=1e-3, out=str(tmp_path / "x"))
    back = train_config_from_args(build_parser().parse_args(cell_command(Cell("x", cfg))[3:]))
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def _finish(cell, val_acc=None, diverged=False):
    cell.out.mkdir(parents=True, exist_ok=True)
    if diverged:
        (cell.out / "diverged.json").write_text("{}")
        return
    (cell.out / "metrics.jsonl").write_text(json.dumps(dict(step=1, val_acc=val_acc)) + "\n")
    (cell.out / "final.pt").write_bytes(b"")


def test_fair_grid_picks_best_rate_and_extends_at_the_edges(tmp_path):
    from kmeansinit.fair import FAIR_ARCHS, best_lrs, final_cells, sweep_cells

    lrs = FAIR_ARCHS["resnet20"].lrs["sgd"]
    cells = sweep_cells(tmp_path, "resnet20", "sgd", inits={"he": dict(init="he"), "kmeans": dict(init="kmeans")})
    assert len(cells) == 2 * len(lrs) and all(c.config.val == 5000 and c.config.model == "resnet20" for c in cells)
    by = {(c.name.split("/")[0], c.config.lr): c for c in cells}
    for lr in lrs:  # he peaks inside the range; kmeans is best at the top one, and the top+1 diverges
        _finish(by["he", lr], 0.5 - abs(lrs.index(lr) - 1) * 0.1)
        _finish(by["kmeans", lr], 0.3 + 0.1 * lrs.index(lr))
    kw = dict(inits={"he": dict(init="he"), "kmeans": dict(init="kmeans")})
    assert best_lrs(tmp_path, "resnet20", "sgd", **kw) == ({"he": lrs[1]}, {"kmeans": lrs[-1] * 4})
    ext = sweep_cells(tmp_path, "resnet20", "sgd", {"kmeans": lrs + [lrs[-1] * 4]}, **kw)
    new = [c for c in ext if c.config.lr == lrs[-1] * 4]
    assert len(new) == 1 and not new[0].done
    _finish(new[0], diverged=True)
    assert new[0].done  # a diverged run is a result: the grid does not rerun it
    best, more = best_lrs(tmp_path, "resnet20", "sgd", **kw)
    assert best == {"he": lrs[1], "kmeans": lrs[-1]} and more == {}
    final = final_cells(tmp_path, "resnet20", "sgd", best, seeds=3)
    assert sorted((c.name, c.config.lr) for c in final)[:3] == [("he/s0", lrs[1]), ("he/s1", lrs[1]), ("he/s2", lrs[1])]
    assert all(c.config.epochs == FAIR_ARCHS["resnet20"].final_epochs for c in final)


def test_fair_rates_are_factor_4_grids_and_an_off_grid_list_is_named(tmp_path, monkeypatch):
    from kmeansinit import fair

    for arch, a in fair.FAIR_ARCHS.items():  # extension and refinement walk each list's grid
        for opt, lrs in a.lrs.items():
            assert all(fair._on_grid(lr, lrs[0], 4.0) for lr in lrs), (arch, opt, lrs)
    # vgg11-nobn's first list (0.003125 is 3.9x 0.0008): every rate but the first was off the grid,
    # so every init looked best at an end and the sweep grew near-duplicates (0.0032 beside 0.003125).
    bad = fair.FairArch("vgg11", {"sgd": [0.0008, 0.003125, 0.0125, 0.05]}, width=0.5)
    monkeypatch.setitem(fair.FAIR_ARCHS, "bad", bad)
    with pytest.raises(ValueError, match=r"bad sgd: .*not a factor-4 grid \(0.003125 is off it\)"):
        fair.best_lrs(tmp_path, "bad", "sgd", inits={"he": dict(init="he")})


def test_fair_grid_refines_the_best_rate_by_factors_of_two(tmp_path):
    from kmeansinit.fair import FAIR_ARCHS, best_lrs, sweep_cells

    assert FAIR_ARCHS["vgg11"].refine and not FAIR_ARCHS["paper"].refine
    kw = dict(inits={"he": dict(init="he")})
    lrs = FAIR_ARCHS["vgg11"].lrs["sgd"]  # 0.0125 ... 0.8, a factor 4 apart
    acc = {lrs[0]: 0.40, lrs[1]: 0.50, lrs[2]: 0.30, lrs[3]: 0.10, lrs[1] * 2: 0.55, lrs[1] / 2: 0.45}
    swept = list(lrs)
    for expect in (lrs[1] * 2, lrs[1] / 2):  # the coarse best's neighbours, one at a time
        for c in sweep_cells(tmp_path, "vgg11", "sgd", {"he": swept}, **kw):
            if not c.done:
                _finish(c, acc[c.config.lr])
        best, more = best_lrs(tmp_path, "vgg11", "sgd", **kw)
        assert best == {} and more == {"he": pytest.approx(expect)}
        swept.append(more["he"])
        (tmp_path / "vgg11-sgd" / "sweep" / "he" / f"lr{more['he']:g}").mkdir(parents=True)
    for c in sweep_cells(tmp_path, "vgg11", "sgd", {"he": swept}, **kw):
        if not c.done:
            _finish(c, acc[c.config.lr])
    # A refined rate wins, and is not refined again (no 0.0707 after 0.1).
    assert best_lrs(tmp_path, "vgg11", "sgd", **kw) == ({"he": pytest.approx(lrs[1] * 2)}, {})


def test_fair_sweep_says_why_it_adds_each_rate(tmp_path, monkeypatch):
    from kmeansinit import fair

    lrs = fair.FAIR_ARCHS["vgg11"].lrs["sgd"]
    peak = lrs[0] / 4  # he peaks below the range

    def fake_grid(cells, **kw):  # a score that falls with the distance from the peak, in octaves
        for c in cells:
            if not c.done:
                _finish(c, 0.9 - abs(math.log2(c.config.lr / peak)) / 20)
        return []

    monkeypatch.setattr(fair, "run_grid", fake_grid)
    lines = []
    kw = dict(inits={"he": dict(init="he")})
    assert fair._sweep(tmp_path, "vgg11", "sgd", kw, jobs=1, dry_run=False, log=lines.append, stack=1) == []
    added = [line for line in lines if "adding lr" in line]
    # Past the low end twice (the peak is the new end), then its factor-2 neighbours.
    assert added == [f"vgg11 sgd he: best rate at an end of the range; adding lr {peak:g}",
                     f"vgg11 sgd he: best rate at an end of the range; adding lr {peak / 4:g}",
                     f"vgg11 sgd he: refining beside the best rate; adding lr {peak * 2:g}",
                     f"vgg11 sgd he: refining beside the best rate; adding lr {peak / 2:g}"]
    assert fair.best_lrs(tmp_path, "vgg11", "sgd", **kw) == ({"he": pytest.approx(peak)}, {})


def test_a_folder_holding_another_cells_run_is_stale_not_done(tmp_path):
    """A finished final run at the old best rate must not pass for the cell at a new best rate."""
    import dataclasses

    from kmeansinit.fair import final_cells

    old, = final_cells(tmp_path, "resnet20", "sgd", {"he": 0.05}, seeds=1)
    _finish(old, 0.6)
    (old.out / "config.json").write_text(json.dumps({**dataclasses.asdict(old.config), "resolved_iterations": 1}))
    assert old.done and old.stale() is None  # its own folder: done, not stale
    new, = final_cells(tmp_path, "resnet20", "sgd", {"he": 0.2}, seeds=1)
    assert new.out == old.out and "lr=0.05" in new.stale() and "lr=0.2" in new.stale()
    lines = []
    assert run_grid([new], dry_run=True, log=lines.append) == [new]
    assert any(line.startswith("# stale: he/s0") and "move that folder away" in line for line in lines)
    assert not any(line.startswith("python") or line.startswith("# done") for line in lines)
    lines.clear()
    assert run_grid([new], log=lines.append) == [new]  # reported as failed, nothing run
    assert "0 finished, 0 to run" in lines[1] and "1 stale" in lines[1]


def test_fair_dry_run_prints_the_sweep(capsys, tmp_path):
    from kmeansinit.cli import main

    assert main(["reproduce", "fair", "--arch", "resnet20", "--out", str(tmp_path / "f"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--model resnet20") == 14 * 4 and "--val 5000" in out and "chosen after the sweep" in out
    assert out.count("--init kmeans-lsuv ") == 4  # the seventh session's candidate, at every rate
    assert out.count("zca_eps=0.1") == 4  # the ninth session's
    # the tenth session's (kmeans-variance), on the nets with BN only, and the thirty-second's cheap init
    # at the default whitening and at this one
    assert out.count("zca_eps=1.0") == 8 and out.count("--init kmeans-fast ") == 8
    assert out.count("--init kmeans-fast --init-option zca_eps=1.0 ") == 4
    assert main(["reproduce", "fair", "--arch", "mobilenetv2", "--out", str(tmp_path / "m"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--model mobilenetv2") == 14 * 4 and out.count("zca_eps=1.0") == 8
    assert out.count("--init kmeans-fast ") == 8
    # The no-BN and few-label settings: every cell carries its setting; both have k-means at a
    # data-dependent (unit output variance) norm, no-BN in the form its cells ran with (the kmeans
    # preset with scale="variance"); the 20-minute kmeans-paper init is left out of both.
    assert main(["reproduce", "fair", "--arch", "paper-nobn", "--arch", "paper-labels2k", "--arch", "vgg11-nobn",
                 "--out", str(tmp_path / "f"), "--optimizer", "sgd", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    nobn = [l for l in lines if "paper-nobn-sgd" in l]
    few = [l for l in lines if "paper-labels2k-sgd" in l]
    assert len(nobn) == 12 * 4 and all("--no-batch-norm" in l for l in nobn)
    # the thirty-first session's cheap init, in both PaperNet settings, at every rate
    assert sum("--init kmeans-fast " in l for l in nobn) == 4 and sum("--init kmeans-fast " in l for l in few) == 4
    assert sum('"variance"' in l for l in nobn) == 4 and not any("kmeans-paper" in l for l in lines)
    assert len(few) == 12 * 4 and all("--labels 2000" in l and "--epochs 20.0" in l for l in few)
    vgg = [l for l in lines if "vgg11-nobn-sgd" in l]
    assert len(vgg) == 11 * 4 and all("--no-batch-norm" in l and "--model vgg11" in l and "--width 0.5" in l for l in vgg)
    # A residual net without BN: ResNet-20 at full width, the no-BN rates, ResNet-20's k-means candidates.
    assert main(["reproduce", "fair", "--arch", "resnet20-nobn", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    res = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert len(res) == 15 * 4 and all("--no-batch-norm" in l and "--model resnet20" in l and "--width" not in l
                                      and "--epochs 1.0" in l for l in res)
    assert sum("--lr 0.0008 " in l for l in res) == 15 and sum("--init fixup " in l for l in res) == 4 and sum("zca_eps=1.0" in l for l in res) == 8
    # Few labels on VGG-11 with BN: the zoo recipe, its rates, and the weaker whitening among the inits.
    assert main(["reproduce", "fair", "--arch", "vgg11-labels2k", "--out", str(tmp_path / "v"), "--dry-run"]) == 0
    few = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert len(few) == 13 * 4 and all("--labels 2000" in l and "--epochs 20.0" in l and "--model vgg11" in l
                                      and "--width 0.5" in l and "--no-batch-norm" not in l for l in few)
    assert sum("zca_eps=1.0" in l for l in few) == 8 and sum("--lr 0.8 " in l for l in few) == 13
    assert sum("--init kmeans-fast " in l for l in few) == 4
    # Other label counts at vgg11-labels2k's budgets in steps (300 to sweep, 900 final): only the labels differ.
    assert main(["reproduce", "fair", "--arch", "vgg11-labels500", "--arch", "vgg11-labels8k",
                 "--out", str(tmp_path / "n"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("python")]
    for labels in (500, 8000):
        few = [l for l in lines if f"--labels {labels} " in l]
        assert len(few) == 12 * 4 and all("--iterations 300 " in l and "--epochs" not in l and "--width 0.5" in l
                                          for l in few)
    assert "x 3 seeds, 900 steps" in out
    # Few labels on ResNet-20: its rates and the zoo recipe at the same step budgets.
    assert main(["reproduce", "fair", "--arch", "resnet20-labels2k", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    few = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert len(few) == 13 * 4 and all("--labels 2000 " in l and "--iterations 300 " in l and "--model resnet20" in l
                                      for l in few)
    assert sum("zca_eps=1.0" in l for l in few) == 4 and sum("--lr 0.0125 " in l for l in few) == 13
    assert sum("--init kmeans-fast " in l for l in few) == 4


def test_fair_step_budget_reaches_the_final_runs_and_a_longer_setting():
    from kmeansinit.fair import FAIR_ARCHS, _longer, final_cells

    cells = final_cells("/tmp/x", "vgg11-labels8k", "sgd", {"he": 0.05}, seeds=2)
    assert [(c.config.iterations, c.config.epochs, c.config.labels) for c in cells] == [(900, None, 8000)] * 2
    assert cells[0].config.resolved_iterations(8000) == 900  # not 14.5 epochs of 62 steps
    longer = _longer("vgg11-labels500", ("he",))
    assert longer.final_steps == 5 * FAIR_ARCHS["vgg11-labels500"].final_steps == 4500
    assert _longer("vgg11", ("he",)).final_steps is None


def test_reproduce_help_names_every_fair_setting():
    from kmeansinit.cli import build_parser
    from kmeansinit.fair import FAIR_ARCHS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["reproduce"]
    text = next(a for a in sub._actions if a.dest == "arch").help
    assert all(f" {name}," in text or f" {name}:" in text for name in FAIR_ARCHS)


def test_fair_only_runs_the_named_inits_and_names_an_unknown_one(capsys, tmp_path):
    from kmeansinit.cli import main

    out = str(tmp_path / "f")
    assert main(["reproduce", "fair", "--arch", "vgg11", "--only", "kmeans-variance-eps1", "--only", "he",
                 "--out", out, "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert len(lines) == 2 * 4  # two inits at the four rates of the sweep
    assert sum("zca_eps=1.0" in l for l in lines) == 4 and sum("--init he " in l for l in lines) == 4
    assert all("zca_eps=1.0" in l for l in lines[:4])  # in the order given, not the setting's
    assert main(["reproduce", "fair", "--arch", "vgg11", "--only", "he", "--only", "kmeans-variance-eps1",
                 "--out", out, "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert all("--init he " in l for l in lines[:4]) and all("zca_eps=1.0" in l for l in lines[4:])
    # kmeans-variance-eps1 is an init of the nets with BN only: an arch with none of the named inits is
    # passed over; a name none of the archs has is an error naming it, before any cell runs.
    assert main(["reproduce", "fair", "--arch", "paper-nobn", "--arch", "vgg11", "--only", "kmeans-variance-eps1",
                 "--optimizer", "sgd", "--out", out, "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    assert len(lines) == 4 and all("--model vgg11" in l for l in lines)
    for name in ("kmeans-typo", "kmeans-variance-eps1"):  # the second: not an init of PaperNet without BN
        assert main(["reproduce", "fair", "--arch", "paper-nobn", "--only", name, "--out", out, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "f").exists()


def test_fair_long_setting_borrows_the_paper_sweeps_rates(capsys, tmp_path):
    """paper-long has no sweep: its final runs take each init's best rate from PaperNet's sweep,
    train 15 epochs and share PaperNet's init cache; without that sweep it says which is missing."""
    from kmeansinit.cli import main
    from kmeansinit.fair import FAIR_ARCHS, _inits, sweep_cells

    a = FAIR_ARCHS["paper-long"]
    assert a.rates_from == "paper" and a.final_epochs == 5 * FAIR_ARCHS["paper"].final_epochs
    assert list(_inits("paper-long")) == list(a.compare) == ["he", "lsuv", "kmeans-variance", "he-variance-norm", "kmeans-fast"]
    nobn = FAIR_ARCHS["paper-nobn-long"]  # the no-BN twin keeps its source's net: no BN layers
    assert nobn.rates_from == "paper-nobn" and nobn.extra == FAIR_ARCHS["paper-nobn"].extra == dict(batch_norm=False)
    # its kmeans-variance is the form paper-nobn's cells ran with (the kmeans preset, scale="variance")
    assert _inits("paper-nobn-long")["kmeans-variance"] == _inits("paper-nobn")["kmeans-variance"]
    out = tmp_path / "f"
    lrs = FAIR_ARCHS["paper"].lrs["sgd"]
    peak = {"he": 2, "lsuv": 1, "kmeans-variance": 2, "kmeans-fast": 2}  # he-variance-norm's sweep is left unfinished
    for c in sweep_cells(out, "paper", "sgd", inits={k: _inits("paper")[k] for k in peak}):
        name = c.name.split("/")[0]
        _finish(c, 0.5 - 0.1 * abs(lrs.index(c.config.lr) - peak[name]))
    args = ["reproduce", "fair", "--arch", "paper-long", "--optimizer", "sgd", "--out", str(out)]
    assert main(args + ["--dry-run"]) == 0
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    lines = [l for l in printed if "paper-long-sgd/final/" in l]
    checks = [l for l in printed if "paper-long-sgd/ratecheck/" in l]  # seed 0 at x0.5 and x2 of each rate
    assert len(printed) == len(lines) + len(checks) and len(lines) == 4 * 3 and len(checks) == 4 * 2
    assert all("--epochs 15.0" in l and f"--init-cache {out / 'init-cache' / 'paper'}" in l for l in printed)
    assert sum(f"--lr {lrs[1]:g} " in l for l in lines) == 3 and sum(f"--lr {lrs[2]:g} " in l for l in lines) == 9
    assert not any("he-variance-norm" in l for l in lines) and not (out / "paper-long-sgd").exists()
    assert main(args) == 2  # a real run refuses: one init has no chosen rate yet
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "he-variance-norm" in err and "--arch paper" in err


def test_fair_long_settings_keep_their_sources_net_and_recipe():
    """Every setting that borrows rates trains its source's own net (model, width, recipe, extras such
    as no BN) 5x longer, with SGD only, and compares inits its source's sweep has."""
    from kmeansinit.fair import FAIR_ARCHS, _inits

    longs = {k: a for k, a in FAIR_ARCHS.items() if a.rates_from}
    assert set(longs) == {"paper-long", "paper-nobn-long", "vgg11-long", "mobilenetv2-long", "vgg11-nobn-long",
                          "resnet20-long", "resnet20-nobn-long"}
    for name, a in longs.items():
        src = FAIR_ARCHS[a.rates_from]
        assert name == f"{a.rates_from}-long" and not src.rates_from
        assert (a.model, a.width, a.recipe, a.extra) == (src.model, src.width, src.recipe, src.extra)
        assert a.final_epochs == 5 * src.final_epochs and list(a.lrs) == ["sgd"] and a.lrs["sgd"] == src.lrs["sgd"]
        assert a.compare and set(a.compare) <= set(_inits(a.rates_from)) and list(_inits(name)) == list(a.compare)
    # the zoo candidates the short budget put first beyond the noise, against the best baseline there
    assert _inits("vgg11-long")["kmeans-variance-eps1"] == dict(init="kmeans-variance", init_options=dict(zca_eps=1.0))
    assert {"lsuv", "kmeans-variance-eps1", "kmeans-fast-eps1"} <= set(FAIR_ARCHS["vgg11-long"].compare)
    assert _inits("vgg11-long")["kmeans-fast-eps1"] == dict(init="kmeans-fast", init_options=dict(zca_eps=1.0))
    assert {"xavier", "kmeans-variance-eps1"} <= set(FAIR_ARCHS["mobilenetv2-long"].compare)
    assert {"lsuv", "kmeans-he-norm"} <= set(FAIR_ARCHS["vgg11-nobn-long"].compare)
    assert FAIR_ARCHS["vgg11-nobn-long"].extra == dict(batch_norm=False)
    assert {"lsuv", "fixup", "kmeans-variance-eps1"} <= set(FAIR_ARCHS["resnet20-nobn-long"].compare)
    assert FAIR_ARCHS["resnet20-nobn-long"].extra == dict(batch_norm=False)
    assert {"lsuv", "kmeans-fast-eps1", "kmeans-variance-eps1"} <= set(FAIR_ARCHS["resnet20-long"].compare)
    assert FAIR_ARCHS["resnet20-long"].final_epochs == 10.0  # 5x its source, checked for every setting above
    # every long setting checks each init's neighbouring rates at the long budget
    assert {n: a.rate_check for n, a in longs.items()} == {n: (0.5, 2.0) for n in longs}  # the set asserted above


def test_fair_long_zoo_setting_runs_at_the_source_sweeps_rates(capsys, tmp_path):
    """vgg11-long: 10 epochs of VGG-11 (width 0.5) at the vgg11 sweep's chosen rates, no sweep folder."""
    from kmeansinit.cli import main
    from kmeansinit.fair import FAIR_ARCHS, _inits, sweep_cells

    out = tmp_path / "f"
    lrs = FAIR_ARCHS["vgg11"].lrs["sgd"]
    peak = {"he": lrs[0], "lsuv": lrs[1], "kmeans-variance-eps1": lrs[2]}
    rates = sorted({r * f for r in lrs for f in (0.5, 1, 2)})  # vgg11 refines: each best's factor-2 neighbours
    for c in sweep_cells(out, "vgg11", "sgd", {k: rates for k in peak}, inits={k: _inits("vgg11")[k] for k in peak}):
        _finish(c, 0.5 - 0.05 * abs(math.log2(c.config.lr / peak[c.name.split("/")[0]])))
    # he's best is at the low end: the vgg11 sweep would extend it, so it has no chosen rate yet
    assert main(["reproduce", "fair", "--arch", "vgg11-long", "--out", str(out), "--dry-run"]) == 0
    every = [l for l in capsys.readouterr().out.splitlines() if l.startswith("python")]
    lines = [l for l in every if "vgg11-long-sgd/final/" in l]
    assert len(lines) == 2 * 3 and all("--model vgg11 --width 0.5" in l and "--epochs 10.0" in l for l in every)
    assert all(f"--init-cache {out / 'init-cache' / 'vgg11'}" in l for l in every)
    assert sum(f"--lr {lrs[1]:g} " in l and "--init lsuv" in l for l in lines) == 3
    assert sum(f"--lr {lrs[2]:g} " in l and "zca_eps=1.0" in l for l in lines) == 3
    # The rate check: seed 0 of each init with a chosen rate at half and twice it, in its own folder.
    checks = [l for l in every if l not in lines]
    assert len(checks) == 2 * 2 and all("vgg11-long-sgd/ratecheck/" in l and "--seed " not in l for l in checks)  # seed 0: the default
    for lr in (lrs[1] / 2, lrs[1] * 2):
        assert sum(f"--lr {lr:g} " in l and "--init lsuv" in l and f"ratecheck/lsuv/lr{lr:g}" in l for l in checks) == 1
    for lr in (lrs[2] / 2, lrs[2] * 2):
        assert sum(f"--lr {lr:g} " in l and "zca_eps=1.0" in l for l in checks) == 1
    assert not (out / "vgg11-long-sgd").exists()


def test_fair_rate_check_extends_where_a_best_rate_lies_at_an_end(tmp_path):
    """A baseline whose best long-budget rate is the highest checked gets the next one, at most twice."""
    from kmeansinit.fair import final_cells, rate_check_cells, rate_check_more, tuned_cells

    out = tmp_path / "f"
    best = {"he": 0.0125, "lsuv": 0.025}
    peak = {"he": 0.1, "lsuv": 0.025}  # he keeps improving upwards; lsuv is best at its chosen rate
    acc = lambda name, lr: 0.8 - 0.02 * abs(math.log2(lr / peak[name]))  # noqa: E731
    for c in final_cells(out, "vgg11-long", "sgd", best, seeds=1):
        _finish(c, acc(c.name.split("/")[0], c.config.lr))
    assert rate_check_more(out, "vgg11-long", "sgd", best) == {}  # nothing checked yet: nothing to extend
    added = []
    for _ in range(4):
        cells = rate_check_cells(out, "vgg11-long", "sgd", best)
        for c in cells:
            if not (c.out / "final.pt").exists():
                _finish(c, acc(c.name.split("/")[0], c.config.lr))
        more = rate_check_more(out, "vgg11-long", "sgd", best)
        assert "lsuv" not in more
        if not more:
            break
        added.append(more["he"])
        (out / "vgg11-long-sgd" / "ratecheck" / "he" / f"lr{more['he']:g}").mkdir(parents=True)
    # x2 = 0.025 is checked; then 0.05 and 0.1 are added (two beyond the factors), and no more.
    assert added == [0.05, 0.1]
    he = sorted(c.config.lr for c in rate_check_cells(out, "vgg11-long", "sgd", best) if c.name.startswith("he/"))
    assert he == [0.00625, 0.025, 0.05, 0.1] and all(c.config.seed == 0 for c in cells)
    # he's best rate at this budget (0.1) is not its borrowed one: seeds 1 and 2 there, in tuned/;
    # lsuv stayed best at its chosen rate, so its final runs serve.
    tuned = tuned_cells(out, "vgg11-long", "sgd", best)
    assert [(c.name, c.config.lr, c.config.seed) for c in tuned] == [("he/s1", 0.1, 1), ("he/s2", 0.1, 2)]
    assert all(c.out.parent.parent.name == "tuned" for c in tuned)


def test_fair_report_gives_a_borrowed_setting_its_sources_budget(tmp_path):
    from kmeansinit.cli import main

    root = tmp_path / "fair"
    _fake_run(root / "paper-sgd" / "sweep" / "he" / "lr0.01", 0.01, [dict(step=20, epoch=2, val_acc=0.40, wall=5)])
    for init, acc in (("he", 0.50), ("kmeans-variance", 0.60)):
        for s in range(2):
            rows = [dict(step=st, epoch=st / 10, val_acc=acc + st / 1000 + s / 100, test_acc=acc, wall=st)
                    for st in (10, 30, 150)]
            _fake_run(root / "paper-long-sgd" / "final" / init / f"s{s}", 0.016, rows)
    assert main(["report", str(root)]) == 0
    text = (root / "fair.md").read_text()
    part = text[text.index("## paper-long-sgd"):]
    assert "the rate the paper-sgd sweep chose" in part and "val @3 epochs |" in part
    # step 10 (1 epoch): 61.0 and 62.0; step 30 (3 epochs): 63.0 and 64.0; the end: 75.0 and 76.0
    assert "| kmeans-variance | 0.016 | 2 | 61.5 ± 0.7 | 60.0 ± 0.0 | 63.5 ± 0.7 | 75.5 ± 0.7 |" in part
    assert "`kmeans-variance` vs the best baseline at 3 epochs (he): +10.0 points" in part


def test_fair_report_rate_check_sets_each_neighbour_beside_the_chosen_rate(tmp_path):
    from kmeansinit.cli import main

    root = tmp_path / "fair"
    _fake_run(root / "vgg11-sgd" / "sweep" / "he" / "lr0.05", 0.05, [dict(step=20, epoch=2, val_acc=0.40, wall=5)])
    long = root / "vgg11-long-sgd"
    row = lambda v, t: [dict(step=100, epoch=10, val_acc=v, test_acc=t, wall=9)]  # noqa: E731
    for s in range(2):  # only seed 0 is the rate check's x1
        _fake_run(long / "final" / "lsuv" / f"s{s}", 0.025, row(0.80 + s / 10, 0.79))
        _fake_run(long / "final" / "kmeans-variance-eps1" / f"s{s}", 0.05, row(0.84, 0.83))
    _fake_run(long / "ratecheck" / "lsuv" / "lr0.0125", 0.0125, row(0.78, 0.77))
    _fake_run(long / "ratecheck" / "lsuv" / "lr0.05", 0.05, row(0.82, 0.815))
    _fake_run(long / "ratecheck" / "kmeans-variance-eps1" / "lr0.025", 0.025, row(0.83, 0.82))
    _fake_run(long / "ratecheck" / "kmeans-variance-eps1" / "lr0.1", 0.1, [], diverged=True)
    assert main(["report", str(root)]) == 0
    part = (root / "fair.md").read_text().split("## vgg11-long-sgd")[1]
    assert "| init | x0.5 | x1 | x2 |" in part
    assert "| lsuv | lr 0.0125: 78.0 (77.0) | lr 0.025: 80.0 (79.0) | lr 0.05: **82.0** (81.5) |" in part
    assert "| kmeans-variance-eps1 | lr 0.025: 83.0 (82.0) | lr 0.05: **84.0** (83.0) | lr 0.1: diverged |" in part
    assert ("kmeans-variance-eps1 84.0 validation (83.0 test) at lr 0.05, "
            "lsuv 82.0 validation (81.5 test) at lr 0.05 (not the chosen rate).") in part
    # Each init over its seeds at its best rate of the check: eps1's final runs (s0, s1), lsuv's
    # rate-check run (0.82) with its tuned seeds (0.84, 0.86).
    for s in (1, 2):
        _fake_run(long / "tuned" / "lsuv" / f"s{s}", 0.05, row(0.82 + s / 50, 0.80))
    assert main(["report", str(root)]) == 0
    part = (root / "fair.md").read_text().split("## vgg11-long-sgd")[1]
    tail = part[part.index("Each init at its best rate of the rate check"):]
    assert "| lsuv | 0.05 | 3 |" in tail and "| 84.0 ± 2.0 | 80.5 ± 0.9" in tail
    assert "| kmeans-variance-eps1 | 0.05 | 2 |" in tail


def _fake_run(folder, lr, rows, init_seconds=1.0, diverged=False):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(lr=lr, test_every=10, optimizer="sgd", init="he")))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "init_report.json").write_text(json.dumps(dict(seconds=init_seconds)))
    (folder / ("diverged.json" if diverged else "final.pt")).write_text("{}")


def test_fair_report_tables_and_verdict(tmp_path):
    from kmeansinit.cli import main

    root = tmp_path / "fair" / "paper-sgd"
    _fake_run(root / "sweep" / "he" / "lr0.01", 0.01, [dict(step=20, epoch=2, val_acc=0.40, wall=5)])
    _fake_run(root / "sweep" / "he" / "lr0.04", 0.04, [dict(step=20, epoch=2, val_acc=0.50, wall=5)])
    _fake_run(root / "sweep" / "he" / "lr0.16", 0.16, [], diverged=True)
    finals = {"he": [0.45, 0.47, 0.46], "kmeans": [0.60, 0.61, 0.62], "he-kmeans-norm": [0.55, 0.57, 0.59]}
    for init, accs in finals.items():
        for s, a in enumerate(accs):
            rows = [dict(step=10, epoch=1, val_acc=a - 0.1, test_acc=a - 0.12, wall=10),
                    dict(step=20, epoch=2, val_acc=a, test_acc=a - 0.02, wall=20)]
            _fake_run(root / "final" / init / f"s{s}", 0.04, rows, init_seconds=3.0)
    assert main(["report", str(tmp_path / "fair")]) == 0
    text = (tmp_path / "fair" / "fair.md").read_text()
    assert "| he | 40.0 | **50.0** | diverged |" in text
    # kmeans: val at end 61.0 ± 1.0, 95% CI 61.0 ± 4.303 * 1.0 / sqrt(3) = [58.5, 63.5] on test (59.0 ± 1.0 -> [56.5, 61.5])
    assert "| kmeans | 0.04 | 3 | 51.0 ± 1.0 | 49.0 ± 1.0 | 61.0 ± 1.0 | 59.0 ± 1.0 [56.5, 61.5] |" in text
    # Target = lowest final mean val accuracy (he: 46.0%): kmeans reaches it at step 10 (10 s + 3 s init).
    assert "| kmeans | 0.04 | 3 | 51.0 ± 1.0 | 49.0 ± 1.0 | 61.0 ± 1.0 | 59.0 ± 1.0 [56.5, 61.5] | 10 | 13 |" in text
    # Welch: se = sqrt(2 * 0.01^2 / 3), df = 4, t = 2.776: 15.0 +/- 2.3 points.
    # p = 2 * P(T_4 > 15 / 0.8165) = 5.1e-5.
    assert ("`kmeans` vs the best baseline at the end (he): +15.0 points (95% CI of the difference [+12.7, +17.3], "
            "Welch p < 0.001): ahead of it.") in text
    # The control against the init whose norms it takes: sd 2 and 1, se = sqrt(5/3) = 1.291, df =
    # se^4 / ((4/3)^2/2 + (1/3)^2/2) = 2.941, t = -4 / 1.291 = -3.098: p = 0.055 (scipy: 0.0549), and
    # the 97.5% quantile at that df (3.218, scipy) makes the interval -4.0 +/- 4.16 points.
    assert ("`he-kmeans-norm` (He's directions at `kmeans`'s norms) vs `kmeans` at the end: -4.0 points "
            "(95% CI of the difference [-8.2, +0.2], Welch p = 0.055): within the seed noise of it.") in text
    assert (tmp_path / "fair" / "lr_sweep.png").stat().st_size > 1000


def test_sigterm_to_a_grid_stops_its_cells_with_checkpoints(fake_cifar10, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "g"
    script = (
        "import sys; from kmeansinit.experiments import build_grid, run_grid; from kmeansinit.cli import main\n"
        f"cells = build_grid('table2', out={str(out)!r}, schedule='tiny', data={str(fake_cifar10)!r}, "
        "extra=dict(width=0.25, batch_size=8, iterations=40))[:4:2]\n"
        "try:\n    run_grid(cells, jobs=2)\nexcept KeyboardInterrupt as e:\n    sys.exit(128 + e.signum)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", KMEANSINIT_TEST_STEP_SLEEP="0.3")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cks = [out / name / "s0" / "checkpoint.pt" for name in ("normal-sgd", "xavier-sgd")]
    deadline = time.time() + 120
    while time.time() < deadline and not all(p.exists() for p in cks):
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert text.count("stopped (checkpoint saved") == 2
    steps = [torch.load(p, weights_only=True)["step"] for p in cks]
    assert all(0 < s < 40 for s in steps)  # each cell checkpointed mid-run and stopped
    assert "SIGTERM at step" in (cks[0].parent / "train.log").read_text()
    cells = build_grid("table2", out=out, schedule="tiny", data=str(fake_cifar10),
                       extra=dict(width=0.25, batch_size=8, iterations=40))[:4:2]
    logs = []
    assert run_grid(cells, jobs=2, log=logs.append) == [] and all(c.done for c in cells)
    assert sum("resuming" in line for line in logs) == 2


@pytest.mark.parametrize("grid", ["study", "screen", "fair"])
def test_fixed_schedule_grids_refuse_schedule_options(grid, tmp_path, capsys):
    for extra in (["--schedule", "paper"], ["--iterations", "100"]):
        assert main(["reproduce", grid, "--out", str(tmp_path / "g"), "--dry-run", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"the {grid} grid has its own fixed schedule" in err[0]


def test_report_over_seeds_spread_thresholds_and_versus_he(tmp_path):
    """Two seeds per cell, numbers chosen so every figure can be computed by hand."""
    def run(folder, init, accs):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dict(init=init, optimizer="sgd", resolved_iterations=40,
                                                            batch_size=8, lr=1e-3, weight_decay=1e-5)))
        rows = [dict(step=10 * (i + 1), epoch=(i + 1) / 2, train_loss=1.0, wall=float(10 * (i + 1)),
                     test_acc=a, test_loss=1.0 - a) for i, a in enumerate(accs)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "final.pt").write_bytes(b"")

    run(tmp_path / "he-sgd" / "s0", "he", [0.20, 0.30, 0.40, 0.50])
    run(tmp_path / "he-sgd" / "s1", "he", [0.20, 0.30, 0.40, 0.52])
    run(tmp_path / "kmeans-sgd" / "s0", "kmeans", [0.25, 0.35, 0.45, 0.60])
    run(tmp_path / "kmeans-sgd" / "s1", "kmeans", [0.15, 0.45, 0.55, 0.64])
    text = write_report(tmp_path).read_text()
    # kmeans: final 62.0 ± 2.8 (sd of 0.60, 0.64); loss 0.380 ± 0.028; @1 epoch (step 20) 40.0 ± 7.1.
    assert "| kmeans-sgd | 2 | 62.0 ± 2.8 | 0.380 ± 0.028 | 40.0 ± 7.1 |" in text
    assert "| he-sgd | 2 | 51.0 ± 1.4 | 0.490 ± 0.014 | 30.0 ± 0.0 |" in text
    # First step at >= 30/40/50/60/70%: kmeans seed 0 at 20/30/40/40/never, seed 1 at 20/20/30/40/never
    # (wall = step here); He both seeds 20/30/40/never.
    assert "| kmeans-sgd | 20 (20s) | 25 (25s) | 35 (35s) | 40 (40s) | – |" in text
    assert "| he-sgd | 20 (20s) | 30 (30s) | 40 (40s) | – | – |" in text
    # Versus He, on mean curves: kmeans 20.0, 40.0, 50.0, 62.0 vs He 20.0, 30.0, 40.0, 51.0: never below,
    # worst gap +0.0; He@1ep = 30.0% at step 20, kmeans crosses 30% between step 10 (20%) and 20 (40%): 15.
    assert "| kmeans-sgd | 4 | yes | +0.0 | 15 | 0.75 |" in text


def test_report_shows_accuracy_at_an_epoch_only_where_an_evaluation_lies_near_it(tmp_path):
    """Evaluations every 2.5 epochs (the paper schedule's 1,000 steps at 390 a epoch): no "@1 ep" figure,
    which would otherwise be the step-1,000 accuracy under both "@1 ep" and "@3 ep"."""
    def run(folder, every):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dict(init="he", optimizer="sgd", resolved_iterations=100,
                                                            batch_size=8, lr=1e-3, weight_decay=1e-5)))
        rows = [dict(step=s, epoch=s / 10, train_loss=1.0, wall=float(s), test_acc=s / 200, test_loss=1.0)
                for s in range(every, 101, every)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "final.pt").write_bytes(b"")

    run(tmp_path / "sparse" / "he-sgd" / "s0", every=25)
    text = write_report(tmp_path / "sparse").read_text()
    assert "acc @1 ep" not in text and "| he-sgd | 1 | 50.0 | 1.000 |" in text
    run(tmp_path / "dense" / "he-sgd" / "s0", every=10)  # an evaluation at every epoch: 10 steps a epoch
    text = write_report(tmp_path / "dense").read_text()
    assert "| he-sgd | 1 | 50.0 | 1.000 | 5.0 | 15.0 |" in text


def test_an_fp32_cell_beside_its_bf16_twin_is_drawn_faint():
    # The two share their init's colour; the faint one is the fp32 cell, only when its twin is there.
    groups = {"he-sgd": [], "he-sgd-bf16": [], "xavier-sgd": []}
    assert _alpha("he-sgd", groups) < 1.0
    assert _alpha("he-sgd-bf16", groups) == _alpha("xavier-sgd", groups) == 1.0


def test_finished_results_folder_without_weights_is_skipped(fake_cifar10, tmp_path):
    # docs/results/ keeps config.json and metrics.jsonl only: a grid pointed at such a copy must not
    # rerun the cell, and a copy cut short (no final evaluation) or one with a checkpoint must run.
    cells = tiny_table2(fake_cifar10, tmp_path / "grid")
    cell = cells[4]
    assert run_grid([cell], log=lambda *_: None) == []
    for name in ("final.pt", "checkpoint.pt", "checkpoint.prev.pt", "init.pt"):
        (cell.out / name).unlink(missing_ok=True)
    assert finished(cell.out) and cell.done
    rows = (cell.out / "metrics.jsonl").read_text().splitlines()
    (cell.out / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    assert not finished(cell.out)
    (cell.out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (cell.out / "checkpoint.pt").write_bytes(b"")
    assert not finished(cell.out)


def test_welch_interval_and_p_against_scipy():
    from scipy import stats as st

    from kmeansinit.report_fair import _stats, _welch

    a, b = [0.612, 0.618, 0.617, 0.605], [0.594, 0.591, 0.601]
    diff, half, p = _welch(_stats(a), _stats(b))
    ref = st.ttest_ind(a, b, equal_var=False)
    assert abs(p - ref.pvalue) < 1e-6
    ci = ref.confidence_interval(0.95)
    assert abs((diff - half) - ci.low) < 1e-6 and abs((diff + half) - ci.high) < 1e-6
    assert _welch(_stats([0.5]), _stats(b))[1] is None  # one seed: no interval


def test_stacked_grid_plans_cells_in_stacks(fake_cifar10, tmp_path):
    from kmeansinit.experiments import plan_jobs

    cells = tiny_table2(fake_cifar10, tmp_path / "grid")  # 6 inits x (SGD, Adam)
    names = lambda jobs: [[c.name for c in job] for job in jobs]  # noqa: E731
    assert names(plan_jobs(cells, 1)) == [[c.name] for c in cells]
    sgd, adam = ([c.name for c in cells if c.config.optimizer == o] for o in ("sgd", "adam"))
    # Cells of one optimizer stack, 3 at most, in grid order of each job's first cell.
    assert names(plan_jobs(cells, 3)) == [sgd[:3], adam[:3], sgd[3:], adam[3:]]
    lines = []
    run_grid(cells, dry_run=True, log=lines.append, stack=3)
    assert len(lines) == 4 and all(l.startswith("python -m kmeansinit stack --cell") for l in lines)
    assert shlex.split(lines[0]).count("--cell") == 3


@pytest.mark.slow
def test_stacked_grid_runs_and_resumes_cells_in_stacks(fake_cifar10, tmp_path):
    # Five subprocesses (20 s): out of CI, where train_stacked's own SIGTERM test and the `kmeansinit
    # stack` test (a stack resumed after SIGKILL) cover resuming stacks.
    import os
    import signal

    from kmeansinit.experiments import plan_jobs

    cells = tiny_table2(fake_cifar10, tmp_path / "grid")
    names = lambda jobs: [[c.name for c in job] for job in jobs]  # noqa: E731
    sgd = [c.name for c in cells if c.config.optimizer == "sgd"]
    # A cell killed at step 6 (checkpoint at 4) cannot join cells that start at 0: it runs alone. (The
    # run below is the SGD cells and that Adam cell.)
    victim = cells[1]
    run = [c for c in cells if c.config.optimizer == "sgd" or c is victim]
    env = dict(os.environ, KMEANSINIT_FAULT="step:6")
    assert subprocess.run(cell_command(victim), env=env, capture_output=True).returncode == -signal.SIGKILL
    assert names(plan_jobs(run, 3)) == [sgd[:3], [victim.name], sgd[3:]]
    logs = []
    assert run_grid(run, log=logs.append, stack=3) == []
    assert all(c.done and (c.out / "final.pt").exists() for c in run)
    assert any(f"{victim.name}: resuming" in l for l in logs)
    assert [l for l in logs if "done" in l and "stack of" in l][0].split(":")[0].endswith(f"stack of 3 ({', '.join(sgd[:3])})")
    for c in run:
        if c is not victim:  # a stack's output is in every member's log; each config names its stack
            assert "stack of" in (c.out / "train.log").read_text()
            assert str(c.out) in json.loads((c.out / "config.json").read_text())["stacked_with"]


def test_report_shows_validation_accuracy_when_runs_hold_out_a_split(tmp_path):
    def run(folder, accs):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dict(init="he", optimizer="sgd", resolved_iterations=20,
                                                            batch_size=8, lr=1e-3, weight_decay=1e-5)))
        rows = [dict(step=20, epoch=1.0, wall=2.0, val_acc=v, test_acc=t, test_loss=0.5) for v, t in [accs]]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "final.pt").write_bytes(b"")

    run(tmp_path / "a" / "s0", (0.40, 0.42))
    run(tmp_path / "a" / "s1", (0.44, 0.46))
    text = write_report(tmp_path).read_text()
    # val 42.0 ± 2.8 (sd of 0.40, 0.44), then test 44.0 ± 2.8.
    assert "| cell | n | final val acc | final test acc |" in text
    assert "| a | 2 | 42.0 ± 2.8 | 44.0 ± 2.8 | 0.500 ± 0.000 |" in text
    # Runs without a validation split keep the table as it was.
    for f in tmp_path.rglob("metrics.jsonl"):
        f.write_text(f.read_text().replace('"val_acc"', '"other"'))
    (tmp_path / "report.md").unlink()
    text = write_report(tmp_path).read_text()
    assert "val acc" not in text and "| a | 2 | 44.0 ± 2.8 |" in text


def test_bf16_grid_cells_are_named_apart_from_fp32_ones(tmp_path, capsys):
    """The paper schedule's precision check keeps he-sgd (fp32) and he-sgd-bf16 in one grid folder:
    each precision's grid must find its own run there, and take neither for the other."""
    import dataclasses

    fp32 = {c.name: c for c in build_grid("table2", out=tmp_path, schedule="paper")}
    bf16 = {c.name: c for c in build_grid("table2", out=tmp_path, schedule="paper", precision="bf16")}
    assert len(bf16) == len(fp32) and set(bf16) == {n.replace("/s", "-bf16/s") for n in fp32}
    he, he16 = fp32["he-sgd/s0"], bf16["he-sgd-bf16/s0"]
    assert he.config.precision == "fp32" and he16.config.precision == "bf16"
    assert he16.out == tmp_path / "he-sgd-bf16" / "s0" and he16.config.tag == "he-sgd-bf16"
    assert he16.config.init_cache == he.config.init_cache  # both precisions start from the same init
    for c in (he, he16):
        c.out.mkdir(parents=True)
        (c.out / "config.json").write_text(json.dumps(dataclasses.asdict(c.config)))
    assert he.stale() is None and he16.stale() is None
    # a bf16 run in the fp32 cell's folder is another cell's run
    (he.out / "config.json").write_text(json.dumps(dataclasses.asdict(he16.config)))
    assert "precision='bf16'" in he.stale()
    # the other grids take the suffix too; the CLI's default stays fp32 for them
    assert [c.name for c in build_grid("table3", out="g", data="/nonexistent", precision="bf16")][0] == "cifar10-vanilla-bf16/s0"
    assert {c.config.precision for c in build_grid("ablation", out="g", precision="bf16")} == {"bf16"}
    with pytest.raises(ValueError, match="precision"):
        build_grid("table2", out="g", precision="fp16")
    assert main(["reproduce", "table2", "--schedule", "paper", "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "he-sgd/s0" in out and "--precision" not in out and "-bf16/" not in out
    assert main(["reproduce", "table2", "--schedule", "paper", "--out", str(tmp_path / "d"), "--dry-run",
                 "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "he-sgd-bf16/s0" in out and "--precision bf16" in out


def test_report_draws_training_and_test_loss_only_for_runs_that_have_a_test_loss(tmp_path):
    from kmeansinit.report import _init_of, plot_losses

    def run(folder, opt, test_loss=True):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(dict(init="he", optimizer=opt, resolved_iterations=20,
                                                            batch_size=8, log_every=10)))
        rows = [dict(step=10, train_loss=1.5, wall=1.0), dict(step=20, train_loss=0.5, wall=2.0),
                dict(step=20, epoch=1.0, wall=2.0, test_acc=0.4, **(dict(test_loss=1.9) if test_loss else {}))]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run(tmp_path / "he-sgd" / "s0", "sgd")
    run(tmp_path / "he-adam-bf16" / "s0", "adam")
    text = write_report(tmp_path).read_text()
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG" and "](losses.png)" in text
    assert _init_of("he-adam-bf16") == _init_of("he-sgd") == "he"  # one colour for an init in both precisions
    for f in tmp_path.rglob("metrics.jsonl"):
        f.write_text(f.read_text().replace('"test_loss"', '"other"'))
    assert plot_losses(collect(tmp_path), tmp_path / "none.png") is False and not (tmp_path / "none.png").exists()


def test_grid_cells_selected_by_optimizer_and_row_in_the_order_given(tmp_path, capsys):
    from kmeansinit.experiments import row_of, select_cells

    cells = build_grid("table2", out=tmp_path, schedule="paper", seeds=2, precision="bf16")
    assert {row_of(c) for c in cells} == {"normal", "xavier", "he", "kmeans-paper", "kmeans", "kmeans-variance"}
    picked = select_cells(cells, optimizers=["sgd"], only=["he", "kmeans-variance", "xavier"])
    assert [c.name for c in picked] == ["he-sgd-bf16/s0", "kmeans-variance-sgd-bf16/s0", "xavier-sgd-bf16/s0",
                                        "he-sgd-bf16/s1", "kmeans-variance-sgd-bf16/s1", "xavier-sgd-bf16/s1"]
    # Optimizers in the order given, before rows; without --only every row, in the grid's order.
    both = select_cells(cells, optimizers=["adam", "sgd"], only=["he"])
    assert [c.name for c in both] == ["he-adam-bf16/s0", "he-sgd-bf16/s0", "he-adam-bf16/s1", "he-sgd-bf16/s1"]
    assert select_cells(cells) == sorted(cells, key=lambda c: c.config.seed)
    assert [row_of(c) for c in select_cells(cells, optimizers=["sgd"])][:6] == list(dict.fromkeys(map(row_of, cells)))
    with pytest.raises(ValueError, match="no row 'kmeans-fast'.*kmeans-variance"):
        select_cells(cells, only=["kmeans-fast"], grid="table2")
    t3 = build_grid("table3", out=tmp_path / "t3", data="/nonexistent")
    assert [row_of(c) for c in select_cells(t3, only=["cifar10-gated"])] == ["cifar10-gated"]
    with pytest.raises(ValueError, match="no optimizer 'sgd'; its optimizers: adam"):
        select_cells(t3, optimizers=["sgd"], grid="table3")
    # The CLI: one command runs the paper schedule's SGD cells in the order of priority.
    assert main(["reproduce", "table2", "--schedule", "paper", "--precision", "bf16", "--out", str(tmp_path / "d"),
                 "--optimizer", "sgd", "--only", "he", "--only", "xavier", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "he-sgd-bf16/s0" in lines[0] and "xavier-sgd-bf16/s0" in lines[1]
    assert main(["reproduce", "table2", "--only", "kmeans-fast", "--out", str(tmp_path / "d"), "--dry-run"]) == 2
    assert "table2 has no row 'kmeans-fast'" in capsys.readouterr().err
