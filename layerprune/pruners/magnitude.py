"""Magnitude pruning (methods_dlp.md §4.3): score |W|, one threshold per matrix; N:M per row group."""

from __future__ import annotations

import torch
from torch import nn

from layerprune.pruners.masks import Pattern, matrix_mask, nm_mask
from layerprune.specs import NoOptions, PrunerSpec


class MagnitudePruner:
    needs_data = False

    def __init__(self, layer: nn.Linear, options: NoOptions | None = None) -> None:
        self.layer = layer

    def add_batch(self, x: torch.Tensor) -> None:  # no statistics needed
        pass

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        W = self.layer.weight.data
        score = W.abs().float()
        mask = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else matrix_mask(score, pattern.sparsity)
        W[mask] = 0
        return mask

    def free(self) -> None:
        pass


SPEC = PrunerSpec("magnitude", NoOptions, cls=MagnitudePruner, needs_data=False, doc="|W|, one threshold per matrix")
