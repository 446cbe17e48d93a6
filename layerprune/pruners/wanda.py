"""Wanda (Sun et al. 2024; methods_dlp.md §4.1): score S_ij = |W_ij| · ‖X_j‖₂, compared per output row.

``add_batch`` accumulates Σ x_j² over all calibration tokens in fp32 on the layer's device (bf16/fp16 inputs as
the squared fp32 norm of each batch, read once); the
reference's normalisation by the number of sequences is a constant per layer and changes no mask.
"""

from __future__ import annotations

import torch
from torch import nn

from layerprune.distributed import all_reduce_sum, reduce_count
from layerprune.pruners.masks import Pattern, nm_mask, row_mask
from layerprune.specs import NoOptions, PrunerSpec


class WandaPruner:
    needs_data = True

    def __init__(self, layer: nn.Linear, options: NoOptions | None = None) -> None:
        self.layer = layer
        self.sq = torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)
        self.nseq = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        self.nseq += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])
        if x.dtype in (torch.float16, torch.bfloat16):
            # one pass over the half-precision input with fp32 accumulation (no fp32 copy, no x² tensor);
            # the reference, too, adds torch.norm(x.float())² per batch
            self.sq += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_()
        else:
            x = x.float()
            self.sq += (x * x).sum(dim=0)

    def share_from(self, other: "WandaPruner") -> None:
        """Take the statistics of a linear that reads the same input (q/k/v, gate/up): Σx² is the same."""
        self.sq, self.nseq = other.sq, other.nseq

    def reduce(self) -> None:
        """Sum the statistics over data-parallel ranks (no-op in one process)."""
        all_reduce_sum(self.sq)
        self.nseq = reduce_count(self.nseq, self.sq.device)

    def scaler_row(self) -> torch.Tensor:
        """The reference's ``scaler_row``: (1/N_seq) Σ_tokens x_j²."""
        return self.sq / max(self.nseq, 1)

    def score(self) -> torch.Tensor:
        return self.layer.weight.data.abs().float() * torch.sqrt(self.scaler_row()).unsqueeze(0)

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        score = self.score()
        mask = nm_mask(score, pattern.n, pattern.m) if pattern.is_nm else row_mask(score, pattern.sparsity)
        self.layer.weight.data[mask] = 0
        return mask

    def free(self) -> None:
        self.sq = torch.empty(0)  # a new empty tensor: a shared Σx² stays with the linears still using it


SPEC = PrunerSpec("wanda", NoOptions, cls=WandaPruner, doc="|W|·‖X‖₂ per output row (Sun et al., ICLR 2024)")
