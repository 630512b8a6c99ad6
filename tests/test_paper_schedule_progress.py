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


DOC = """# Title

## Table 2 so far

```bash
# a comment in a code block is not a heading
python progress.py
```

| cell | old |
|---|---|
| he-sgd-bf16/s0 | stale |

Text after the table.

## Filter norms

| cell | norm |
|---|---|
| he-sgd-bf16/s0 | 1.62 |
"""


def test_into_replaces_only_the_table_of_its_own_section(tmp_path):
    """The norms section has rows of the same cells: --into must leave it, and every other line, alone."""
    runs = tmp_path / "runs"
    _cell(runs, "he-sgd-bf16", [0.40, 0.61], finished=True)
    doc = tmp_path / "paper_schedule.md"
    doc.write_text(DOC)
    printed = _run("--runs", str(runs)).stdout.splitlines()
    out = _run("--runs", str(runs), "--into", str(doc))
    assert out.returncode == 0, out.stderr
    text = doc.read_text()
    assert text == DOC.replace("| cell | old |\n|---|---|\n| he-sgd-bf16/s0 | stale |\n", "\n".join(printed) + "\n")
    assert "| he-sgd-bf16/s0 | 1.62 |" in text and "stale" not in text


def test_into_names_a_missing_heading_or_table_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    _cell(runs, "he-sgd-bf16", [0.40], finished=True)
    doc = tmp_path / "paper_schedule.md"
    doc.write_text("# Title\n\n## Table 2 so far\n\nno table yet\n\n## Filter norms\n\n| a |\n|---|\n")
    for section, says in (("## Table 2 so far", "no table under"), ("## Missing", "no heading")):
        out = _run("--runs", str(runs), "--into", str(doc), "--section", section)
        assert out.returncode != 0 and says in out.stderr and str(doc) in out.stderr and "Traceback" not in out.stderr
    assert doc.read_text().endswith("| a |\n|---|\n")  # untouched
