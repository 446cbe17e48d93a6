"""Across-layer sparsity allocation: one registry, one signature.

``fn(ctx: AllocContext, target: float, options) -> Allocation``. Each method's file defines its options
dataclass and ``SPEC`` (:class:`~layerprune.specs.AllocatorSpec`: function, options, capabilities);
adding a method is that one file and one ``register_allocator`` line below. The CLI flags, the
validation, the ratio-cache key and ``layerprune ls`` all come from the spec.
"""

from __future__ import annotations

from layerprune.allocation import alphapruning, dlp, owl, svnup, uniform
from layerprune.allocation.common import AllocContext, Allocation, clip_and_restore, mixed_nm
from layerprune.errors import UserError
from layerprune.specs import AllocatorSpec

ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(spec: AllocatorSpec) -> AllocatorSpec:
    """Add an allocator (its CLI flags, validation, cache key and ``layerprune ls`` entry follow from the spec)."""
    ALLOCATORS[spec.name] = spec
    return spec


register_allocator(uniform.SPEC)
register_allocator(owl.SPEC)
register_allocator(alphapruning.SPEC)
register_allocator(dlp.SPEC)
register_allocator(svnup.SPEC)


def get_allocator(name: str, nm: bool = False) -> AllocatorSpec:
    """The allocator called ``name``; with ``nm`` it must also support an N:M pattern."""
    if name not in ALLOCATORS:
        raise UserError(f"unknown allocation '{name}': use one of {', '.join(ALLOCATORS)}")
    spec = ALLOCATORS[name]
    if nm and not spec.supports_nm:
        ok = [n for n, s in ALLOCATORS.items() if s.supports_nm]
        raise UserError(f"N:M patterns work with {', '.join(ok)} allocation, not {name}")
    return spec


def check_target(spec: AllocatorSpec, target: float) -> None:
    lo, hi = spec.target_range
    if not (lo <= target <= hi):
        raise UserError(f"{spec.name} needs a target sparsity in [{lo}, {hi}] (got {target})")


__all__ = ["ALLOCATORS", "AllocContext", "Allocation", "AllocatorSpec", "check_target", "clip_and_restore",
           "get_allocator", "mixed_nm", "register_allocator"]
