import shutil

import pytest
import torch

import kmeansinit.train as T
from kmeansinit.archive import RESULT_FILES, archive_runs
from kmeansinit.cli import main
from kmeansinit.experiments import finished
from kmeansinit.train import RunError, train


def tiny(data, out, **kw):
    base = dict(data=str(data), out=str(out), width=0.25, batch_size=8, iterations=12, eval_every=6, log_every=3,
                checkpoint_every=4, init="he", init_images=16, threads=1)
    return T.TrainConfig(**{**base, **kw})


def _cut_at_step(monkeypatch, n):
    """Make the next training run die at its n-th step, as a kill would (no checkpoint at that moment)."""
    hits = {"step": 0}

    def fault(point):
        if point == "step":
            hits["step"] += 1
            if hits["step"] == n:
                raise RuntimeError("killed")

    monkeypatch.setattr(T, "_fault", fault)


@pytest.fixture
def grid(fake_cifar10, tmp_path, monkeypatch):
    """A folder of runs: one finished, one cut at step 7 (checkpoint at 4), one diverged, an init cache."""
    src = tmp_path / "runs"
    train(tiny(fake_cifar10, src / "he" / "s0"), progress=False)
    train(tiny(fake_cifar10, tmp_path / "ref"), progress=False)  # what the cut run would have become
    _cut_at_step(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny(fake_cifar10, src / "he" / "s1"), progress=False)
    monkeypatch.undo()
    with pytest.raises(RunError, match="loss became"):
        train(tiny(fake_cifar10, src / "big" / "s0", lr=1e30, init="normal", init_options=dict(std=10.0)), progress=False)
    (src / "init-cache" / "abc").mkdir(parents=True)
    (src / "init-cache" / "abc" / "config.json").write_text("{}")
    return src


def test_archive_copies_results_of_finished_and_diverged_runs_only(grid, tmp_path):
    dst = tmp_path / "kept"
    s = archive_runs(grid, dst)
    assert sorted(s.finished) == ["big/s0", "he/s0"] and s.skipped == ["he/s1"] and not s.in_flight
    kept = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert kept == sorted([f"he/s0/{n}" for n in RESULT_FILES if n != "diverged.json"]
                          + [f"big/s0/{n}" for n in RESULT_FILES])
    for name in ("config.json", "metrics.jsonl", "init_report.json"):
        assert (dst / "he" / "s0" / name).read_bytes() == (grid / "he" / "s0" / name).read_bytes()
    assert finished(dst / "he" / "s0")  # the copy, without weights, still counts as done
    assert "1 unfinished left out" in str(s)


def test_archived_checkpoint_resumes_to_the_uninterrupted_run(grid, tmp_path, capsys):
    dst = tmp_path / "kept"
    assert main(["archive", str(grid), str(dst), "--checkpoints"]) == 0
    assert "1 unfinished with their newest checkpoint" in capsys.readouterr().out
    cut = dst / "he" / "s1"
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 4 and not finished(cut)
    assert not (cut / "init.pt").exists() and not (cut / "checkpoint.prev.pt").exists()
    moved = tmp_path / "new-machine" / "s1"  # a new machine goes on from the committed copy
    shutil.copytree(cut, moved)
    train(T.load_run_config(moved), resume=True, progress=False)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(moved / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # The source run finishes; archived again, its copy holds results only, the checkpoint gone.
    train(T.load_run_config(grid / "he" / "s1"), resume=True, progress=False)
    s = archive_runs(grid, dst)
    assert "he/s1" in s.finished and not s.skipped
    assert not (cut / "checkpoint.pt").exists() and not (cut / "final.pt").exists() and finished(cut)
    assert archive_runs(grid, tmp_path / "w", weights=True) and (tmp_path / "w" / "he" / "s1" / "final.pt").exists()


def test_archive_copies_the_checkpoint_resume_would_read(grid, tmp_path):
    cut = grid / "he" / "s1"
    assert torch.load(cut / "checkpoint.prev.pt", weights_only=False)["step"] == 0  # the init's own
    (cut / "checkpoint.pt").write_bytes(b"garbage")  # cut short: --resume falls back to the previous one
    s = archive_runs(grid, tmp_path / "kept", checkpoints=True)
    assert s.in_flight == ["he/s1"]
    kept = tmp_path / "kept" / "he" / "s1" / "checkpoint.pt"
    assert kept.read_bytes() == (cut / "checkpoint.prev.pt").read_bytes()
    (cut / "checkpoint.prev.pt").write_bytes(b"garbage")  # nothing left to resume from: not copied
    s = archive_runs(grid, tmp_path / "again", checkpoints=True)
    assert s.unreadable == ["he/s1"] and not s.in_flight and not (tmp_path / "again" / "he" / "s1").exists()
    assert "no readable checkpoint: he/s1" in str(s)


def test_archive_errors_name_the_folder(tmp_path, capsys):
    assert main(["archive", str(tmp_path / "none"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none" in err and err.count("\n") == 0
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.json").write_text("{not json")
    (tmp_path / "runs" / "a" / "final.pt").write_bytes(b"")
    assert main(["archive", str(tmp_path / "runs"), str(tmp_path / "runs" / "kept")]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["archive", str(tmp_path / "runs"), str(tmp_path / "kept")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not valid JSON" in err
