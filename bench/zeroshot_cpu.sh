#!/usr/bin/env bash
# Zero-shot (lm-eval, 0-shot) of smollm2-135m on the CPU: dense vs 70% Wanda uniform vs 70% Wanda+DLP.
# Usage: bash bench/zeroshot_cpu.sh OUTDIR [LIMIT]   (LIMIT documents per task; default 100)
set -euo pipefail
OUT=${1:-runs/zeroshot}; LIMIT=${2:-100}; mkdir -p "$OUT"
TASKS=arc_easy,arc_challenge,boolq,piqa,winogrande,openbookqa,hellaswag,rte
layerprune eval smollm2-135m --ppl "" --tasks $TASKS --limit $LIMIT --device cpu --json --quiet > "$OUT/dense.json"
for alloc in uniform dlp; do
  layerprune prune smollm2-135m --sparsity 0.7 --pruner wanda --allocation $alloc --nsamples 32 --seqlen 512 \
    --eval "" --tasks $TASKS --limit $LIMIT --device cpu --json --quiet > "$OUT/wanda70_$alloc.json"
done
