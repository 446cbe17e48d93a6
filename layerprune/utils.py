"""Small shared helpers: devices, memory, logging, progress switches."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger("layerprune")


def setup_logging(level: str = "INFO") -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[layerprune] %(message)s"))
        log.addHandler(h)
    log.setLevel(os.environ.get("LAYERPRUNE_LOG", level))
    log.propagate = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from layerprune.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return dev


def model_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fits_resident(move_bytes: float, block_bytes: float, free_bytes: float) -> bool:
    """The residency rule (one place): a model whose bytes still to move plus eight blocks' worth of working
    memory (Hessians, scores, activations) stay under 80% of the accelerator's free memory stays there for a
    pass; used when loading (``models.loading.load_placement``) and per pass (``engine.decide_resident``)."""
    return move_bytes + 8 * block_bytes < 0.8 * free_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so a reader never sees it half-written, even with several runs sharing one cache:
    a per-process temporary name, then an atomic rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """The one switch for TF32 matmuls on CUDA: set for the block, restored afterwards (SparseGPT's solve
    turns it off as the reference does; the SV-NUP game turns it on unless asked for full fp32)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
