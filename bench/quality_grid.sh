#!/usr/bin/env bash
# The quality issue's grid on the device: one `layerprune compare` per calibration seed, the seeds dealt over
# the GPUs present (one process per GPU, its seeds one after another), then one merged directory with
# mean ± std tables, figures and the HTML report. Resumable: a cell already in OUT/seedN/results.json is
# skipped, so a call that ran out of time is continued by the next one with OUT carried back.
#   bash bench/quality_grid.sh MODEL OUT SEEDS [layerprune compare options ...]
#   bash bench/quality_grid.sh /root/stage/q15.gguf $OUT/q15 0,1,2 --allocations uniform,owl,alphapruning,dlp,svnup \
#        --pruners wanda,sparsegpt --sparsities 0.5,0.6,0.7 --ppl wikitext2,c4 --dtype bfloat16 --device cuda
set -u
[ $# -ge 3 ] || { echo "usage: bash bench/quality_grid.sh MODEL OUT SEEDS [compare options]" >&2; exit 2; }
model=$1; out=$2; seeds=$3; shift 3
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU); [ "$ngpu" -ge 1 ] || ngpu=1
IFS=, read -r -a list <<< "$seeds"
pids=()
for ((g = 0; g < ngpu; g++)); do
  mine=(); for ((i = g; i < ${#list[@]}; i += ngpu)); do mine+=("${list[$i]}"); done
  [ ${#mine[@]} -gt 0 ] || continue
  (
    for s in "${mine[@]}"; do
      CUDA_VISIBLE_DEVICES=$g python3 -m layerprune.cli compare "$model" --seeds "$s" --out "$out/seed$s" \
        --yes --quiet "$@" >> "$out/seed$s.log" 2>&1
      echo "seed $s on GPU $g: exit $?" >> "$out/status.txt"
    done
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cat "$out/status.txt"
dirs=(); for s in "${list[@]}"; do [ -f "$out/seed$s/results.json" ] && dirs+=("$out/seed$s"); done
[ ${#dirs[@]} -gt 0 ] || { echo "no seed finished a cell" >&2; exit 1; }
python3 bench/merge_grids.py "$out/all" "${dirs[@]}" && python3 -m layerprune.cli report "$out/all"
