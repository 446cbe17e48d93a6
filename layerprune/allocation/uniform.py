"""Uniform allocation: every linear gets the target sparsity (the SparseGPT/Wanda baseline)."""

from __future__ import annotations

from layerprune.allocation.common import AllocContext, Allocation, expand_blocks
from layerprune.specs import AllocatorSpec, NoOptions


def allocate_uniform(ctx: AllocContext, target: float, options: NoOptions | None = None) -> Allocation:
    pb = [float(target)] * ctx.adapter.n_blocks
    return Allocation("uniform", target, pb, expand_blocks(ctx.adapter, pb), {})


SPEC = AllocatorSpec("uniform", NoOptions, fn=allocate_uniform, needs_calibration=False, supports_nm=True,
                     target_range=(0.0, 1.0), cached=False, doc="every linear at the target")
