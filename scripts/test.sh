#!/usr/bin/env bash
# Set up, then run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${LAYERPRUNE_DATA:-}" ] && [ -d ../shared/data ]; then export LAYERPRUNE_DATA="$(cd ../shared/data && pwd)"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 -m pytest -q -p no:cacheprovider "$@" tests
