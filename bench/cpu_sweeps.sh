#!/usr/bin/env bash
# CPU sweeps for BENCHMARKS.md (no GPU time left in the session that wrote them): DLP vs uniform
# across sparsities, and DLP's alpha, on smollm2-135m with a reduced protocol (32 x 512 calibration,
# first 32 windows of 512 tokens for evaluation). Usage: bash bench/cpu_sweeps.sh OUTDIR
set -euo pipefail
OUT=${1:-runs/cpu_sweeps}
COMMON="--nsamples 32 --seqlen 512 --ppl wikitext2,c4 --eval-seqlen 512 --eval-max-windows 32 --quiet --device cpu"
layerprune compare smollm2-135m --allocations uniform,dlp,owl --pruners wanda --sparsities 0.5,0.6,0.7,0.8 $COMMON --out "$OUT/sparsity"
for a in 0.05 0.10 0.20 0.25; do
  layerprune compare smollm2-135m --allocations dlp --pruners wanda --sparsities 0.7 --alpha $a $COMMON --out "$OUT/alpha_$a"
done
