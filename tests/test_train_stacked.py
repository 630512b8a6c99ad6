"""Stacked training: each cell of a stack is the same run as the cell alone, in files and in weights."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import kmeansinit.train_stacked as ts
from kmeansinit.cli import main
from kmeansinit.train import RunError, TrainConfig, load_state, train
from kmeansinit.train_stacked import train_stacked

from conftest import write_cifar

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", n_train=100, n_test=20)
    return tmp_path / "data"


@pytest.fixture
def float64():
    # The whole loop in float64: a stacked cell then differs from the cell alone by ~1e-16 per step,
    # which 50 steps of training on random labels grow to ~1e-12 (float32's 1e-7 would grow to O(1):
    # the dynamics are chaotic, so equality is checked where rounding is small).
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


CELLS = [("a", dict(init="he", seed=0)), ("b", dict(init="xavier", seed=1)),
         ("c", dict(init="kmeans", seed=2, init_images=16, init_options={"steps": 3}))]


def config(data, out, model="paper", optimizer="sgd", iterations=50, **kw):
    base = dict(data=str(data), width=0.25, batch_size=8, iterations=iterations, eval_every=25, log_every=5,
                checkpoint_every=20, val=20, init_images=40, threads=1, model=model, optimizer=optimizer,
                lr=0.01 if optimizer == "sgd" else 1e-3)
    if model != "paper":
        base.update(crop=2, nesterov=optimizer == "sgd", weight_decay=5e-4, lr_schedule="cosine")
    return TrainConfig(**(base | kw), out=str(out))


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(alone, stacked, tol):
    a, b = load_state(Path(alone) / "final.pt"), load_state(Path(stacked) / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=tol, atol=tol, msg=k)
    ra, rb = rows(alone), rows(stacked)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and [set(r) for r in ra] == [set(r) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("lr", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=tol, abs=tol), key


# PaperNet/SGD in CI; Adam and ResNet-20 (30 s together) with -m slow.
@pytest.mark.parametrize("model,optimizer,steps", [("paper", "sgd", 50),
                                                   pytest.param("paper", "adam", 25, marks=pytest.mark.slow),
                                                   pytest.param("resnet20", "sgd", 25, marks=pytest.mark.slow)])
def test_stacked_cells_equal_each_cell_alone(data, tmp_path, float64, model, optimizer, steps):
    for name, kw in CELLS:
        train(config(data, tmp_path / f"alone-{name}", model, optimizer, iterations=steps, **kw), progress=False)
    last = train_stacked([config(data, tmp_path / f"stack-{name}", model, optimizer, iterations=steps, **kw)
                          for name, kw in CELLS], progress=False)
    assert [r["step"] for r in last] == [steps] * 3
    for name, _ in CELLS:
        assert_same_run(tmp_path / f"alone-{name}", tmp_path / f"stack-{name}", tol=1e-9)
        out = tmp_path / f"stack-{name}"
        assert {"config.json", "init_report.json", "init.pt", "checkpoint.pt", "checkpoint.prev.pt", "final.pt"} <= \
            {p.name for p in out.iterdir()}
        saved = json.loads((out / "config.json").read_text())
        assert saved["stacked_with"] == [str(tmp_path / f"stack-{n}") for n, _ in CELLS]
        assert saved["resolved_iterations"] == steps
        init_alone, init_stacked = (load_state(d / "init.pt") for d in (tmp_path / f"alone-{name}", out))
        for k in init_alone:  # the same init, computed the same way
            assert torch.equal(init_stacked[k], init_alone[k]), k


def test_float32_stacked_step_equals_alone_up_to_rounding(data, tmp_path):
    for name, kw in CELLS[:2]:
        train(config(data, tmp_path / f"alone-{name}", iterations=1, **kw), progress=False)
    train_stacked([config(data, tmp_path / f"stack-{name}", iterations=1, **kw) for name, kw in CELLS[:2]],
                  progress=False)
    for name, _ in CELLS[:2]:
        assert_same_run(tmp_path / f"alone-{name}", tmp_path / f"stack-{name}", tol=1e-5)


def test_sigterm_checkpoints_every_cell_and_the_stack_or_a_cell_alone_resumes(data, tmp_path, float64, monkeypatch):
    for name, kw in CELLS:
        train(config(data, tmp_path / f"alone-{name}", iterations=40, **kw), progress=False)
    cfgs = [config(data, tmp_path / f"stack-{name}", iterations=40, **kw) for name, kw in CELLS]
    real, hits = ts._fault, {"step": 0}

    def term_at_step_20(point):
        hits[point] = hits.get(point, 0) + 1
        if point == "step" and hits["step"] == 20:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; the handler only sets a flag
        real(point)

    monkeypatch.setattr(ts, "_fault", term_at_step_20)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train_stacked(cfgs, progress=False)
    assert stopped.value.signum == signal.SIGTERM
    monkeypatch.setattr(ts, "_fault", real)
    for c in cfgs:  # the signal came during step 21: every cell saved it (as train does); none finished
        assert load_state(Path(c.out) / "checkpoint.pt")["step"] == 21 and not (Path(c.out) / "final.pt").exists()
        assert rows(c.out)[-1]["step"] == 20  # the last log row (log_every 5); step 21's loss is in the checkpoint
    train_stacked(cfgs[:2], resume=True, progress=False)  # a smaller stack of the same step
    train(cfgs[2], resume=True, progress=False)  # a stacked cell's checkpoint is an ordinary run's
    for name, _ in CELLS:
        assert_same_run(tmp_path / f"alone-{name}", tmp_path / f"stack-{name}", tol=1e-9)


def test_a_diverging_cell_stops_alone_and_the_others_go_on(data, tmp_path, float64, monkeypatch):
    for name, kw in CELLS[:2]:
        train(config(data, tmp_path / f"alone-{name}", iterations=20, **kw), progress=False)
    real = ts._cached_init

    def poisoned(model, cfg, *args, **kw):
        report = real(model, cfg, *args, **kw)
        if cfg.tag == "bad":
            with torch.no_grad():
                model.classifier[-1].weight.fill_(float("inf"))
        return report

    monkeypatch.setattr(ts, "_cached_init", poisoned)
    cfgs = [config(data, tmp_path / "stack-a", iterations=20, **CELLS[0][1]),
            config(data, tmp_path / "stack-bad", iterations=20, tag="bad"),
            config(data, tmp_path / "stack-b", iterations=20, **CELLS[1][1])]
    with pytest.raises(RunError, match=r"stack-bad \(step 1\).*2 other cells finished"):
        train_stacked(cfgs, progress=False)
    bad = tmp_path / "stack-bad"
    assert json.loads((bad / "diverged.json").read_text())["step"] == 1 and not (bad / "final.pt").exists()
    assert load_state(bad / "checkpoint.pt")["step"] == 0  # its last good checkpoint is kept
    for name in ("a", "b"):
        assert_same_run(tmp_path / f"alone-{name}", tmp_path / f"stack-{name}", tol=1e-9)


def test_cells_that_cannot_share_a_stack_are_refused_in_one_line(data, tmp_path):
    a, b = config(data, tmp_path / "a"), config(data, tmp_path / "b", lr=0.02)
    with pytest.raises(ValueError, match=r"must share lr"):
        train_stacked([a, b], progress=False)
    with pytest.raises(ValueError, match="same run folder"):
        train_stacked([a, config(data, tmp_path / "a", seed=3)], progress=False)
    train_stacked([config(data, tmp_path / "c", iterations=4, checkpoint_every=2)], progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        train_stacked([config(data, tmp_path / "c", iterations=4)], progress=False)


def test_cells_at_different_steps_do_not_resume_as_one_stack(data, tmp_path):
    a, b = (config(data, tmp_path / n, iterations=8, checkpoint_every=2) for n in "ab")
    train_stacked([a, b], progress=False)
    ck = load_state(tmp_path / "a" / "checkpoint.pt")
    (tmp_path / "a" / "final.pt").unlink()
    torch.save(dict(ck, step=6), tmp_path / "a" / "checkpoint.pt")
    (tmp_path / "b" / "final.pt").unlink()
    torch.save(dict(ck, step=4), tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(RunError, match=r"same step; got .*a: 6, .*b: 4; run them one by one"):
        train_stacked([a, b], resume=True, progress=False)


def test_stack_command_line_and_its_errors(data, tmp_path, capsys):
    run = [sys.executable, "-m", "kmeansinit", "stack", "--quiet"]
    cells = [f"--data {data} --width 0.25 --batch-size 8 --iterations 6 --eval-every 3 --init {init} --seed {i} "
             f"--out {tmp_path / init}" for i, init in enumerate(("he", "xavier"))]
    env = dict(os.environ, KMEANSINIT_FAULT="step:4")  # SIGKILL at step 4: resume from the step-3 checkpoint
    killed = subprocess.run(run + sum((["--cell", c + " --checkpoint-every 3"] for c in cells), []), env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert all(load_state(tmp_path / n / "checkpoint.pt")["step"] == 3 for n in ("he", "xavier"))
    done = subprocess.run(run + ["--cell", f"--resume {tmp_path / 'he'}", "--cell", f"--resume {tmp_path / 'xavier'}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["step"] for line in done.stdout.splitlines() if line.startswith("{")] == [6, 6]
    assert "resumed" in done.stdout and all((tmp_path / n / "final.pt").exists() for n in ("he", "xavier"))
    # Bad cells, in process (a subprocess costs seconds of imports each).
    assert main(["stack", "--quiet", "--cell", cells[0].replace("he --seed", "he --lr 0.5 --seed").replace("/he", "/he2"),
                 "--cell", cells[1].replace("/xavier", "/x2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("kmeansinit: error: cells of one stack must share lr")
    assert main(["stack", "--quiet", "--cell", "--init nonsense"]) == 2
    assert "--cell 1 ('--init nonsense') is not a valid set of train arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_stack_trains(data, tmp_path):
    # torch.compile takes about a minute here: marked slow, out of CI (as train's compile test).
    last = train_stacked([config(data, tmp_path / n, iterations=4, eval_every=4, compile=True, **kw)
                          for n, kw in CELLS[:2]], progress=False)
    assert all(r["step"] == 4 and r["train_loss"] == r["train_loss"] for r in last)
    assert all((tmp_path / n / "final.pt").exists() for n, _ in CELLS[:2])
