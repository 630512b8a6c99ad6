"""The examples in examples/ run as their docstrings say (on a small fake CIFAR-10)."""
import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_inits_example_runs_and_resumes(fake_cifar10, tmp_path, capsys):
    ex = _load("compare_inits")
    path = tmp_path / "cmp.json"
    argv = ["--data", str(fake_cifar10), "--model", "paper", "--width", "0.25", "--steps", "2", "--batch", "16",
            "--val", "10", "--lrs", "0.01", "--seeds", "1", "--path", str(path)]
    assert ex.main(argv) == 0
    table = capsys.readouterr().out
    runs = json.loads(path.read_text())["runs"]
    for label in ("he", "lsuv", "kmeans-variance-eps1"):
        assert f"| {label} |" in table
        mine = [r for r in runs if r["init"] == label]
        assert {r["seed"] for r in mine} == {0, 1} and all(0 <= r["score"] <= 1 for r in mine)
    n = len(runs)
    assert ex.main(argv) == 0  # everything read back from the file: no new run
    assert len(json.loads(path.read_text())["runs"]) == n and capsys.readouterr().out.count("run ") == 0


def test_compare_inits_example_names_a_bad_val(fake_cifar10, capsys):
    ex = _load("compare_inits")
    with pytest.raises(SystemExit):
        ex.main(["--data", str(fake_cifar10), "--val", "0"])
    assert "--val: val must be between 1 and 59 (training images), got 0" in capsys.readouterr().err
