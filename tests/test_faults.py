"""Faults and safety (README "Faults and safety"): kill anywhere, SIGTERM, corrupt or planted files, full disk."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kmeansinit.cli import main
from kmeansinit.train import RunError, TrainConfig, train

ARGS = ["--width", "0.25", "--batch-size", "8", "--iterations", "12", "--checkpoint-every", "4", "--eval-every", "6",
        "--log-every", "3", "--init", "kmeans", "--init-images", "16", "--init-option", "steps=1", "--threads", "1",
        "--quiet"]


def cli(data, out, *extra, env=None, resume=False):
    cmd = [sys.executable, "-m", "kmeansinit", "train"]
    cmd += ["--resume", str(out), "--quiet"] if resume else ["--data", str(data), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
                          text=True, timeout=300)


def rows(out):
    return [{k: v for k, v in json.loads(x).items() if k != "wall"} for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a: Path, b: Path):
    fa, fb = torch.load(a / "final.pt", weights_only=True), torch.load(b / "final.pt", weights_only=True)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_cifar

    root = tmp_path_factory.mktemp("faults")
    write_cifar(root, "cifar10")
    r = cli(root, root / "ref")
    assert r.returncode == 0, r.stderr[-2000:]
    return root, root / "ref"


# Every place a kill can land: the init, each atomic write (init.pt, then the checkpoints of steps 0, 4,
# 8, 12 and final.pt: six), each evaluation (steps 6 and 12), each training step.
MOMENTS = [("init", 1)] + [("save", k) for k in range(1, 7)] + [("eval", k) for k in (1, 2)] + \
          [("step", k) for k in range(1, 13)]
SCHEDULE = [("init", 1), ("save", 3), ("eval", 1)] + random.Random(0).sample(
    [m for m in MOMENTS if m not in (("init", 1), ("save", 3), ("eval", 1))], 7)


def _kill_and_resume(reference, tmp_path, moment):
    data, ref = reference
    out = tmp_path / "cut"
    r = cli(data, out, env={"KMEANSINIT_FAULT": f"{moment[0]}:{moment[1]}"})
    assert r.returncode == -signal.SIGKILL, (moment, r.returncode, r.stderr[-1000:])
    assert not (out / "final.pt").exists() or moment == ("save", 6)
    r = cli(data, out, resume=True)
    assert r.returncode == 0, (moment, r.stderr[-2000:])
    same_run(ref, out)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("moment", SCHEDULE[:3], ids=lambda m: f"{m[0]}{m[1]}")
def test_killed_at_three_moments_resumes_bit_identical(reference, tmp_path, moment):
    _kill_and_resume(reference, tmp_path, moment)


@pytest.mark.slow
@pytest.mark.parametrize("moment", SCHEDULE[3:], ids=lambda m: f"{m[0]}{m[1]}")
def test_killed_at_the_other_seven_moments_resumes_bit_identical(reference, tmp_path, moment):
    _kill_and_resume(reference, tmp_path, moment)


def test_sigterm_saves_the_current_step_and_resumes_identically(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "kmeansinit", "train", "--data", str(data), "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", KMEANSINIT_TEST_STEP_SLEEP="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        time.sleep(0.05)
    time.sleep(0.45)  # somewhere between log points
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text
    stopped = int(text.split("SIGTERM at step ")[1].split(":")[0])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stopped  # saved at once: nothing lost
    assert cli(data, out, resume=True).returncode == 0
    same_run(ref, out)


def _cut_at_step(reference, tmp_path, step=7):
    data, _ = reference
    out = tmp_path / "cut"
    assert cli(data, out, env={"KMEANSINIT_FAULT": f"step:{step}"}).returncode == -signal.SIGKILL
    return out


def test_truncated_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    out = _cut_at_step(reference, tmp_path)
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["step"] == 0
    blob = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    r = cli(None, out, resume=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint.pt: unreadable" in r.stdout and "resuming from" in r.stdout and "(step 0)" in r.stdout
    same_run(reference[1], out)


def test_garbage_checkpoints_stop_with_one_line(reference, tmp_path, capsys):
    out = _cut_at_step(reference, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"not a checkpoint at all")
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable checkpoint" in err[0] and str(out) in err[0]
    assert (out / "metrics.jsonl").read_text() == before


class _Planted:
    """Unpickling this creates a file: what a malicious run folder could do to a pickle loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_refused_not_run(reference, tmp_path, capsys):
    data, ref = reference
    marker = tmp_path / "pwned"
    out = _cut_at_step(reference, tmp_path)
    (out / "checkpoint.prev.pt").unlink()
    torch.save(dict(model=_Planted(marker), optimizer={}, step=1, wall=0.0, rng={}), out / "checkpoint.pt")
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refused: it holds pickled objects" in err and not marker.exists()
    # An init cache entry: the run that would reuse it stops with the same line.
    from kmeansinit.data import load_dataset
    from kmeansinit.train import init_key

    cfg = TrainConfig(data=str(data), out=str(tmp_path / "c"), width=0.25, batch_size=8, iterations=2, init="he",
                      init_cache=str(tmp_path / "cache"), threads=1)
    (tmp_path / "cache").mkdir()
    torch.save(dict(model=_Planted(marker), report={}), tmp_path / "cache" / f"he-{init_key(cfg, load_dataset('cifar10', data))}.pt")
    with pytest.raises(RunError, match="refused: it holds pickled objects"):
        train(cfg, progress=False)
    assert not marker.exists()
    # The report of a folder holding planted weights skips them, and writes the rest.
    folder = tmp_path / "report"
    import shutil

    shutil.copytree(ref, folder / "kmeans" / "s0")
    torch.save({"w": _Planted(marker)}, folder / "kmeans" / "s0" / "init.pt")
    assert main(["report", str(folder)]) == 0
    assert "skipping" in capsys.readouterr().err and not marker.exists() and (folder / "report.md").exists()


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(reference, tmp_path, monkeypatch):
    import kmeansinit.train as T

    data, _ = reference
    real, calls = torch.save, {"n": 0}

    def failing(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # init.pt, checkpoint 0, checkpoint 4, then checkpoint 8 fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(T.torch, "save", failing)
    out = tmp_path / "full"
    cfg = TrainConfig(data=str(data), out=str(out), width=0.25, batch_size=8, iterations=12, checkpoint_every=4,
                      eval_every=6, log_every=3, init="he", threads=1)
    with pytest.raises(RunError, match=r"checkpoint\.pt: could not be written \(No space left on device\)"):
        train(cfg, progress=False)
    monkeypatch.setattr(T.torch, "save", real)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4 and not list(out.glob("*.tmp"))
    train(TrainConfig(out=str(out)), resume=True, progress=False)
    assert (out / "final.pt").exists()


def test_corrupt_metrics_line_is_named_and_skipped(reference, tmp_path):
    out = _cut_at_step(reference, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = cli(None, out, resume=True)
    assert r.returncode == 0 and "metrics.jsonl: line 1 corrupt; skipped" in r.stdout


def test_missing_or_corrupt_config_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "no config.json here" in capsys.readouterr().err
    (tmp_path / "run" / "config.json").write_text("{cut")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json: corrupt" in err[0]


def test_a_bad_init_option_fails_before_the_data_is_read(tmp_path, capsys):
    """--data points nowhere: the error must be the option's, so the option was checked first, and no
    run folder is made."""
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"]
    assert main(args + ["--init", "kmeans-variance", "--init-option", "zca_eps=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kmeansinit: error: k-means option zca_eps must be a number, got 'abc'"]
    assert main(args + ["--init", "he", "--init-option", "zca_eps=1.0"]) == 2
    assert "init 'he' takes no option 'zca_eps'" in capsys.readouterr().err
    assert not out.exists()
