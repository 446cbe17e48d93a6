"""Within-layer pruners. Each follows sparsegpt's shape: ``add_batch`` → ``prune`` → ``free``.

Registry: one line per method. ``needs_data`` says whether the engine must run calibration data
through the block before pruning it.
"""

from __future__ import annotations

from layerprune.errors import UserError
from layerprune.pruners.magnitude import MagnitudePruner
from layerprune.pruners.masks import Pattern, matrix_mask, nm_mask, parse_nm, row_mask
from layerprune.pruners.sparsegpt import SparseGPTPruner
from layerprune.pruners.wanda import WandaPruner

PRUNERS: dict[str, type] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}


def get_pruner(name: str) -> type:
    if name not in PRUNERS:
        raise UserError(f"unknown pruner '{name}': use one of {', '.join(PRUNERS)}")
    return PRUNERS[name]


__all__ = ["PRUNERS", "Pattern", "get_pruner", "matrix_mask", "nm_mask", "parse_nm", "row_mask"]
