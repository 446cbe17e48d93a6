#!/usr/bin/env bash
# Set up, then prune the small default model to 50% with Wanda + DLP and evaluate it (2-core CPU: 2 min 20 s measured).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${LAYERPRUNE_DATA:-}" ] && [ -d ../shared/data ]; then export LAYERPRUNE_DATA="$(cd ../shared/data && pwd)"; fi
exec layerprune prune smollm2-135m --sparsity 0.5 --pruner wanda --allocation dlp \
  --nsamples 16 --seqlen 512 --eval wikitext2 --eval-seqlen 512 --eval-max-windows 8 --dense-ppl "$@"
