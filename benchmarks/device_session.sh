#!/usr/bin/env bash
# The one prepared GPU session (a device machine is lent 15 minutes in all: see DEVELOPERS.md).
#
# Here, first (once): kmeansinit pack --out shared/cifar10.npz   # 18 MiB; shared/ travels, CIFAR's 177 MB cannot
# Then as the device `run` command (timeout_s 600):
#     bash benchmarks/device_session.sh 480
#
# 1. Stacked-cell throughput on the GPU, N = 1, 4, 10 cells, fp32 and bf16 (performance issue,
#    target 3): benchmarks/stacked_cells.py, appended to $OUT/RESULTS.md. About a minute.
# 2. Table 2 at the paper's schedule (75,000 iterations): 12 cells, the 6 SGD and the 6 Adam cells
#    each as one stacked model (--stack 6), SGD first, one stack at a time, resumed from the bundles
#    an earlier session left in docs/results/paper_schedule/gpu/, until SECONDS (the argument,
#    default 480) have passed since the start; then SIGTERM, and every cell checkpoints.
# 3. Back in $OUT: RESULTS.md, bench.log, grid.log and the grid as tar bundles of at most 15 MiB (the
#    device returns 8 files of 16 MiB at most): every config, metrics and log in runs-0.tar, the
#    checkpoints of unfinished cells in the rest. Here: copy them to docs/results/paper_schedule/gpu/
#    and commit; the next session resumes. What travels is at most 64 MiB (the repo about 13, the
#    pack 18): the 6 SGD cells' checkpoints (19 MB) fit, all 12 (47 MB) do not; hence one stack at a time.
#
# Knobs for the CPU rehearsal (tests/test_device_session.py): BENCH_DEVICE, BENCH_CELLS, BENCH_STEPS,
# GRID_SCHEDULE, GRID_STACK, GRID_DATA, GRID_BUNDLES, GRID_RUNS.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-480}
start=$(date +%s)
: "${OUT:?OUT: the folder whose files come back}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" KMEANSINIT_RESULTS="$OUT/RESULTS.md"
data=${GRID_DATA:-shared/cifar10.npz}
bundles=${GRID_BUNDLES:-docs/results/paper_schedule/gpu}
runs=${GRID_RUNS:-/tmp/paper_schedule}
if [ ! -f "$data" ]; then
    echo "device_session: no $data; run 'kmeansinit pack --out $data' before the session" >&2
    exit 2
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/bench.log" 2>&1

echo "== 1. stacked-cell throughput ($(date -u +%T))"
python3 benchmarks/stacked_cells.py --device "${BENCH_DEVICE:-cuda}" --cells "${BENCH_CELLS:-1,4,10}" \
    --precision fp32,bf16 --steps "${BENCH_STEPS:-20}" >> "$OUT/bench.log" 2>&1 || echo "benchmark failed (bench.log)"
tail -n 12 "$OUT/bench.log"

echo "== 2. Table 2, paper schedule ($(date -u +%T))"
mkdir -p "$runs"
for t in "$bundles"/runs-*.tar; do
    if [ -f "$t" ]; then tar -xf "$t" -C "$runs"; fi
done
left=$(( budget - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
    # SIGTERM to the grid reaches its cells: each saves a checkpoint at once (tests/test_experiments.py).
    timeout -s TERM -k 60 "$left" python3 -m kmeansinit reproduce table2 --schedule "${GRID_SCHEDULE:-paper}" \
        --data "$data" --out "$runs" --jobs 1 --stack "${GRID_STACK:-6}" > "$OUT/grid.log" 2>&1
    echo "grid exit $? after $(( $(date +%s) - start )) s"
else
    echo "no time left for the grid"
fi
tail -n 5 "$OUT/grid.log" 2>/dev/null

echo "== 3. bundles ($(date -u +%T))"
python3 benchmarks/_bundle.py "$runs" "$OUT"
echo "done after $(( $(date +%s) - start )) s"
