"""docs/results/paper_schedule/progress.py: Table 2 at the paper's schedule, read from run folders."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "results" / "paper_schedule" / "progress.py"


def _cell(runs: Path, name: str, accs: list[float], finished: bool) -> None:
    d = runs / name / "s0"
    d.mkdir(parents=True)
    cfg = dict(init=name.split("-")[0], optimizer="sgd", precision="bf16", resolved_iterations=1000 * len(accs) if finished else 99_000)
    (d / "config.json").write_text(json.dumps(cfg))
    rows = [dict(step=1000 * (i + 1), train_loss=0.5, test_acc=a, test_loss=1.0 + i) for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (d / "final.pt").write_bytes(b"")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_tail_is_the_mean_and_sd_of_the_last_evaluations(tmp_path):
    accs = [0.40, 0.61, 0.63, 0.62, 0.66]
    _cell(tmp_path, "he-sgd-bf16", accs, finished=True)
    _cell(tmp_path, "xavier-sgd-bf16", [0.5, 0.55], finished=False)
    out = _run("--runs", str(tmp_path), "--at", "2000", "--tail", "3")
    assert out.returncode == 0, out.stderr
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in out.stdout.splitlines()[2:]}
    he = lines["he-sgd-bf16/s0"]
    last3 = [100 * a for a in accs[-3:]]
    assert he[2] == "5,000"  # finished: no "unfinished" mark
    assert he[9] == "61.00"  # --at 2000
    assert he[10] == f"{statistics.mean(last3):.2f} ({statistics.stdev(last3):.2f}, 3,000)"
    assert he[8] == "74.0"  # the paper's He/SGD
    xavier = lines["xavier-sgd-bf16/s0"]
    assert "unfinished" in xavier[2]
    assert xavier[10] == "–"  # two evaluations, fewer than the tail asks for


def test_a_tail_of_one_and_a_missing_folder_are_one_line_errors(tmp_path):
    out = _run("--runs", str(tmp_path), "--tail", "1")
    assert out.returncode != 0 and "--tail 1" in out.stderr and "Traceback" not in out.stderr
    out = _run("--runs", str(tmp_path / "nope"))
    assert out.returncode != 0 and "nope: no such folder" in out.stderr and "Traceback" not in out.stderr
