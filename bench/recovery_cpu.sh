#!/usr/bin/env bash
# Recovery and composition on the CPU (reduced protocol): smollm2-135m at 70% Wanda+DLP, then
# LoRA (separate and masked), then int8 / int4 RTN on top. Usage: bash bench/recovery_cpu.sh OUTDIR [STEPS SEQLEN BATCH]
set -euo pipefail
OUT=${1:-runs/recovery}; STEPS=${2:-100}; SEQ=${3:-512}; BS=${4:-4}; mkdir -p "$OUT"
EV="--eval wikitext2 --eval-seqlen 512 --eval-max-windows 32 --device cpu --json --quiet"
[ -d "$OUT/pruned" ] || layerprune prune smollm2-135m --sparsity 0.7 --pruner wanda --allocation dlp \
  --nsamples 32 --seqlen 512 $EV --out "$OUT/pruned" > "$OUT/prune.json"
for mode in separate masked-lora; do
  [ -d "$OUT/lora_$mode" ] || layerprune finetune "$OUT/pruned" --steps $STEPS --seqlen $SEQ --batch-size $BS \
    --mode $mode $EV --out "$OUT/lora_$mode" > "$OUT/lora_$mode.json"
done
for b in int8 int4; do
  [ -d "$OUT/$b" ] || layerprune quantize "$OUT/pruned" --bits $b --group-size 128 --seqlen 512 $EV \
    --out "$OUT/$b" > "$OUT/$b.json"
done
