"""Uniform allocation: every linear gets the target sparsity (the SparseGPT/Wanda baseline)."""

from __future__ import annotations

from layerprune.allocation.common import AllocContext, Allocation, expand_blocks


def allocate_uniform(ctx: AllocContext, target: float, **_: object) -> Allocation:
    pb = [float(target)] * ctx.adapter.n_blocks
    return Allocation("uniform", target, pb, expand_blocks(ctx.adapter, pb), {})
