#!/usr/bin/env bash
# Run several bench/gpu_bench.py jobs side by side on one device GPU, each with its own log and JSON in $OUT.
# Wall times of jobs that shared the GPU are not comparable with solo runs (BENCHMARKS.md marks them).
#   bash bench/device_jobs.sh SECONDS NAME "GPU_BENCH ARGS" [NAME "ARGS" ...]
set -u
limit=$1; shift
pids=()
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  # shellcheck disable=SC2086
  timeout "$limit" python3 bench/gpu_bench.py $args --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 &
  pids+=($!)
  sleep 2
done
for p in "${pids[@]}"; do wait "$p"; done
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null | tail -1
for f in "$OUT"/*.log; do echo "== $f"; grep -h "^## \|Error\|error" "$f" | tail -8; done
