"""Every CPU benchmark, one after another, each appending its block to RESULTS.md.

Run it on an otherwise idle machine: the ratios are measured side by side, but other work on the
same cores still adds noise.

    python benchmarks/run_all.py [--quick]

The full run takes about 17 minutes on the 2-core CPU (init_scale's whole-training-set init is 4 of them).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = [
    ("train_throughput.py", ["--device", "cpu", "--steps", "20"], ["--device", "cpu", "--steps", "3"]),
    ("gated_and_flops.py", ["--steps", "20"], ["--steps", "2"]),
    ("init_time.py", ["--device", "cpu", "--paper-steps", "200"], ["--device", "cpu", "--paper-steps", "5"]),
    ("init_scale.py", ["--sizes", "256,1024,8192", "--full"], ["--sizes", "64,128"]),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run, measures nothing")
    a = p.parse_args()
    failed = []
    for script, full, quick in RUNS:
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *(quick if a.quick else full)]).returncode:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
