"""Across-layer sparsity allocation: one registry, one signature.

``fn(ctx: AllocContext, target: float, **options) -> Allocation``. Adding a method is one file and
one line below.
"""

from __future__ import annotations

from typing import Callable

from layerprune.allocation.alphapruning import allocate_alphapruning
from layerprune.allocation.common import AllocContext, Allocation, clip_and_restore, mixed_nm
from layerprune.allocation.dlp import allocate_dlp
from layerprune.allocation.owl import allocate_owl
from layerprune.allocation.svnup import allocate_svnup
from layerprune.allocation.uniform import allocate_uniform
from layerprune.errors import UserError

ALLOCATORS: dict[str, Callable[..., Allocation]] = {
    "uniform": allocate_uniform,
    "owl": allocate_owl,
    "alphapruning": allocate_alphapruning,
    "dlp": allocate_dlp,
    "svnup": allocate_svnup,
}


# allocations that can give every block its own N of an N:M pattern (mixed N:M, methods_dlp.md §2.3)
NM_ALLOCATIONS = ("uniform", "dlp", "owl")


def get_allocator(name: str, nm: bool = False) -> Callable[..., Allocation]:
    """The allocator called ``name``; with ``nm`` it must also support an N:M pattern."""
    if name not in ALLOCATORS:
        raise UserError(f"unknown allocation '{name}': use one of {', '.join(ALLOCATORS)}")
    if nm and name not in NM_ALLOCATIONS:
        raise UserError(f"N:M patterns work with {', '.join(NM_ALLOCATIONS)} allocation, not {name}")
    return ALLOCATORS[name]


__all__ = ["ALLOCATORS", "AllocContext", "Allocation", "clip_and_restore", "get_allocator", "mixed_nm"]
