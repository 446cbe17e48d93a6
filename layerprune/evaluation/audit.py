"""Sparsity audit: measure what a (saved or in-memory) model really contains."""

from __future__ import annotations

import torch
from torch import nn

from layerprune.models.adapter import ModelAdapter


def nm_ok(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at least ``n`` zeros."""
    rows, cols = w.shape
    if cols % m:
        return False
    return bool(((w.reshape(rows, cols // m, m) == 0).sum(-1) >= n).all())


def sparsity_audit(model: nn.Module, nm: tuple[int, int] | None = None) -> dict:
    """Zeros per linear and per block, the global sparsity of the prunable linears, and the N:M check."""
    ad = ModelAdapter.of(model)
    per_block, total_z, total_n, nm_bad = [], 0, 0, []
    for i in range(ad.n_blocks):
        z = n = 0
        for name, lin in ad.linears(i).items():
            w = lin.weight.data
            z += int((w == 0).sum())
            n += w.numel()
            if nm and not nm_ok(w, *nm):
                nm_bad.append(ad.full_name(i, name))
        per_block.append(z / n)
        total_z += z
        total_n += n
    out = {"global": total_z / total_n, "per_block": per_block, "prunable_params": total_n}
    if nm:
        out["nm_violations"] = nm_bad
    return out
