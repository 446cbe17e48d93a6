#!/usr/bin/env bash
# CPU sweep of DLP's alpha at 70% Wanda on smollm2-135m with a reduced protocol (32 x 512 calibration,
# first 32 windows of 512 tokens for evaluation on WikiText-2 and C4). Usage: bash bench/cpu_sweeps.sh OUTDIR
set -euo pipefail
OUT=${1:-runs/cpu_sweeps}
COMMON="--nsamples 32 --seqlen 512 --ppl wikitext2,c4 --eval-seqlen 512 --eval-max-windows 32 --quiet --device cpu"
layerprune compare smollm2-135m --allocations uniform,dlp --pruners wanda --sparsities 0.7 --alpha 0.15 $COMMON --out "$OUT/alpha_0.15"
for a in 0.05 0.10 0.20 0.25; do
  layerprune compare smollm2-135m --allocations dlp --pruners wanda --sparsities 0.7 --alpha $a $COMMON --out "$OUT/alpha_$a"
done
