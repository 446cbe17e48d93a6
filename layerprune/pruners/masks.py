"""Pure mask math, testable without a model. A mask is a bool tensor, ``True`` = prune (set to zero).

Ties are broken by column index (stable sorts), so masks are deterministic even for 4-bit weights
whose magnitudes tie often (models.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from layerprune.errors import UserError


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern of one linear: unstructured at ``sparsity``, or ``n`` zeros in every ``m``."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.4f}"


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``: ``n`` zeros in every group of ``m`` consecutive inputs."""
    try:
        n_s, m_s = text.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise UserError(f"malformed N:M pattern '{text}': write it as N:M with integers, e.g. 2:4") from None
    if not (0 < n < m):
        raise UserError(f"N:M pattern '{text}' needs 0 < N < M (N zeros in every M weights), e.g. 2:4 or 4:8")
    return n, m


def parse_pattern(pattern: str, sparsity: float | None) -> tuple[float, int, int]:
    """``unstructured`` → (sparsity, 0, 0); ``N:M`` → (N/M, N, M)."""
    if pattern == "unstructured":
        if sparsity is None:
            raise UserError("--sparsity is required for unstructured pruning")
        check_sparsity(sparsity)
        return float(sparsity), 0, 0
    n, m = parse_nm(pattern)
    if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
        logging.getLogger("layerprune").info("pattern %s fixes the sparsity at %.3f (ignoring --sparsity %s)",
                                             pattern, n / m, sparsity)
    return n / m, n, m


def check_sparsity(s: float) -> None:
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise UserError(f"sparsity must be a number in [0, 1), got {s!r}: e.g. --sparsity 0.7 for 70% zeros")
    if not (0.0 <= s < 1.0):
        raise UserError(f"sparsity must be in [0, 1), got {s}: e.g. --sparsity 0.7 for 70% zeros")


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's per-output comparison group: prune the ``floor(C_in * s)`` lowest scores of every row."""
    rows, cols = score.shape
    k = int(cols * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold over the whole matrix: prune the ``floor(numel * s)`` lowest scores.

    The reference zeroes ``score <= sorted[k]`` (one more than k, and more on ties); this prunes exactly k.
    """
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(score.flatten(), stable=True)[1][:k]
        mask[idx] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, prune the ``n`` lowest scores of each group of ``m`` consecutive columns."""
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"N:M with M={m} needs the input width ({cols}) to be a multiple of M")
    g = score.reshape(rows, cols // m, m)
    idx = torch.sort(g, dim=-1, stable=True)[1][..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(rows, cols)
