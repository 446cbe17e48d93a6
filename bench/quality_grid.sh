#!/usr/bin/env bash
# One `layerprune compare` grid over several calibration seeds on this machine's GPUs: a job per seed, run by
# bench/quality_queue.py (one process per GPU, resumable: a cell already in OUT/seedN/results.json is
# skipped), then one merged directory OUT/all with mean ± std tables, figures and the HTML report.
#   bash bench/quality_grid.sh MODEL OUT SEEDS [layerprune compare options ...]
#   bash bench/quality_grid.sh /root/stage/q15.gguf $OUT/q15 0,1,2 --allocations uniform,owl,alphapruning,dlp,svnup \
#        --pruners wanda,sparsegpt --sparsities 0.5,0.6,0.7 --ppl wikitext2,c4 --dtype bfloat16 --device cuda
# For a grid split finer (per seed and pruner) and started while models are still being carried to a lent
# device, write the job list yourself and use bench/quality_device.sh (BENCHMARKS.md, "Quality across seeds").
set -u
[ $# -ge 3 ] || { echo "usage: bash bench/quality_grid.sh MODEL OUT SEEDS [compare options]" >&2; exit 2; }
model=$1; out=$2; seeds=$3; shift 3
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
IFS=, read -r -a list <<< "$seeds"
jobs="$out/jobs.txt"; : > "$jobs"
for s in "${list[@]}"; do
  printf 'seed%s %q --seeds %s' "$s" "$model" "$s" >> "$jobs"
  for a in "$@"; do printf ' %q' "$a" >> "$jobs"; done
  echo >> "$jobs"
done
python3 bench/quality_queue.py start "$jobs" "$out" --per-gpu 1 --foreground
dirs=(); for s in "${list[@]}"; do [ -f "$out/seed$s/results.json" ] && dirs+=("$out/seed$s"); done
[ ${#dirs[@]} -gt 0 ] || { echo "no seed finished a cell" >&2; exit 1; }
python3 bench/merge_grids.py "$out/all" "${dirs[@]}" && python3 -m layerprune.cli report "$out/all"
