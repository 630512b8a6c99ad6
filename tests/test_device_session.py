"""The prepared GPU session (benchmarks/device_session.sh), rehearsed on the CPU: a first session
stopped by its budget mid-grid, its bundles carried into a second that resumes and finishes."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import write_cifar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bundle import bundle  # noqa: E402


def test_bundles_hold_metrics_and_unfinished_checkpoints_within_their_size(tmp_path):
    runs = tmp_path / "runs"
    for cell, finished in (("a/s0", True), ("b/s0", False), ("c/s0", False), ("d/s0", False)):
        d = runs / cell
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "metrics.jsonl").write_text('{"step": 1}\n')
        (d / "checkpoint.pt").write_bytes(os.urandom(600_000))
        (d / "init.pt").write_bytes(b"x" * 10)
        if finished:
            (d / "final.pt").write_bytes(b"x" * 10)
    (runs / "init-cache").mkdir()
    (runs / "init-cache" / "kmeans-1.pt").write_bytes(b"x" * 100)
    written, left = bundle(runs, tmp_path / "out", max_bundles=2, mib=1.0)
    names = [sorted(tarfile.open(p).getnames()) for p in written]
    assert [p.name for p in written] == ["runs-0.tar", "runs-1.tar", "runs-2.tar"]
    assert names[0] == sorted(f"{c}/s0/{f}" for c in "abcd" for f in ("config.json", "metrics.jsonl"))
    # One 600 kB checkpoint per 1 MiB bundle, two bundles: the third unfinished cell's stays behind, the
    # small cached init still fits; a finished cell's checkpoint, final weights and init.pt never go.
    assert names[1:] == [["b/s0/checkpoint.pt"], ["c/s0/checkpoint.pt", "init-cache/kmeans-1.pt"]]
    assert [p.relative_to(runs).as_posix() for p in left] == ["d/s0/checkpoint.pt"]
    assert all(p.stat().st_size <= 2**20 + 10_240 for p in written[1:])


@pytest.mark.slow
def test_device_session_rehearsed_on_cpu_stops_bundles_and_resumes(tmp_path):
    # About 3 minutes: 12 tiny-schedule cells of full-width PaperNet, twice, and a short benchmark.
    data = tmp_path / "data"
    write_cifar(data, n_train=300, n_test=50)
    pack = tmp_path / "c10.npz"
    subprocess.run([sys.executable, "-m", "kmeansinit", "pack", "--data", str(data), "--out", str(pack)], check=True,
                   capture_output=True)
    env = dict(os.environ, BENCH_DEVICE="cpu", BENCH_CELLS="1", BENCH_STEPS="1", GRID_SCHEDULE="tiny",
               GRID_DATA=str(pack), GRID_BUNDLES=str(tmp_path / "carried"))

    def session(name: str, budget: int) -> Path:
        out = tmp_path / name
        out.mkdir()
        run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_session.sh"), str(budget)], cwd=tmp_path,
                             env=dict(env, OUT=str(out), GRID_RUNS=str(tmp_path / f"{name}-runs")),
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        return out

    # A budget that ends the first session inside the grid (measured: the benchmark and the first inits
    # take most of it), so that SIGTERM stops it with checkpoints.
    first = session("first", 150)
    assert "stacked" in (first / "RESULTS.md").read_text()
    log = (first / "grid.log").read_text()
    assert "stopped (checkpoint saved" in log or "done" in log
    (tmp_path / "carried").mkdir()
    for t in first.glob("runs-*.tar"):
        shutil.copy(t, tmp_path / "carried")
    second = session("second", 600)
    assert "resuming" in (second / "grid.log").read_text() or "finished" in (second / "grid.log").read_text()
    with tarfile.open(second / "runs-0.tar") as tar:
        metrics = [n for n in tar.getnames() if n.endswith("metrics.jsonl")]
        assert len(metrics) == 12
        last = [json.loads(tar.extractfile(n).read().decode().splitlines()[-1]) for n in metrics]
    assert all(r["step"] == 8 for r in last)
