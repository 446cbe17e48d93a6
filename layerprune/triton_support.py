"""Whether Triton kernels run here, and the switch CI uses to run them on the CPU under Triton's interpreter.

Triton is optional: without it (or without CUDA, unless interpreted) every kernel has a PyTorch path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

# found, not imported: importing triton costs ~0.5 s of every command's start-up; the kernel modules
# (sparse/kernels.py, pruners/obs_triton.py) import it when they are first used
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton when it is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_ON_CPU = [False]


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Route CPU tensors through the kernels (under Triton's interpreter: how CI tests them)."""
    _ON_CPU[0] = True
    try:
        yield
    finally:
        _ON_CPU[0] = False


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on ``device``."""
    return HAVE_TRITON and (device.type == "cuda" or (_ON_CPU[0] and interpreted()))
