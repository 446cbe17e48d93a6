"""Model loading (hub id, local dir, GGUF, packaged aliases) and the generic block/linear adapter."""

from layerprune.models.adapter import ModelAdapter, find_blocks, find_linears
from layerprune.models.loading import ALIASES, load_model, resolve_spec

__all__ = ["ALIASES", "ModelAdapter", "find_blocks", "find_linears", "load_model", "resolve_spec"]
