"""Within-layer pruners. Each follows sparsegpt's shape: ``add_batch`` → (``reduce``) → ``prune`` → ``free``.

Registry: each method's file defines ``SPEC`` (:class:`~layerprune.specs.PrunerSpec`: the class, its
options dataclass, whether it needs calibration data) and is registered in one line below.
"""

from __future__ import annotations

from layerprune.errors import UserError
from layerprune.pruners import magnitude, sparsegpt, wanda
from layerprune.pruners.masks import Pattern, matrix_mask, nm_mask, parse_nm, parse_pattern, row_mask
from layerprune.specs import PrunerSpec

PRUNERS: dict[str, PrunerSpec] = {}


def register_pruner(spec: PrunerSpec) -> PrunerSpec:
    """Add a pruner (its CLI flags, validation and ``layerprune ls`` entry follow from the spec)."""
    PRUNERS[spec.name] = spec
    return spec


register_pruner(magnitude.SPEC)
register_pruner(wanda.SPEC)
register_pruner(sparsegpt.SPEC)


def get_pruner(name: str) -> PrunerSpec:
    if name not in PRUNERS:
        raise UserError(f"unknown pruner '{name}': use one of {', '.join(PRUNERS)}")
    return PRUNERS[name]


__all__ = ["PRUNERS", "Pattern", "PrunerSpec", "get_pruner", "matrix_mask", "nm_mask", "parse_nm",
           "parse_pattern", "register_pruner", "row_mask"]
