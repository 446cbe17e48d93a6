#!/usr/bin/env bash
# Why DLP loses to uniform on gemma3-270m: DLP's alpha, statistic and granularity at 60% Wanda, with the
# reduced CPU protocol of the gemma 50/60% sweep in BENCHMARKS.md (32 x 512 C4 calibration, first 16
# windows of 512 tokens, C4 and WikiText-2). Usage: bash bench/cpu_gemma_dlp.sh OUTDIR
set -euo pipefail
OUT=${1:-runs/cpu_gemma_dlp}
COMMON="--pruners wanda --sparsities 0.6 --nsamples 32 --seqlen 512 --ppl c4,wikitext2 --eval-seqlen 512 --eval-max-windows 16 --quiet --device cpu"
for a in 0.05 0.10 0.20; do
  layerprune compare gemma3-270m --allocations dlp --alpha $a $COMMON --out "$OUT/alpha_$a"
done
layerprune compare gemma3-270m --allocations dlp --stat mean $COMMON --out "$OUT/stat_mean"
layerprune compare gemma3-270m --allocations dlp --granularity linear $COMMON --out "$OUT/granularity_linear"
