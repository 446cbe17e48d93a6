"""Shared pieces of every allocator: the context it reads, the result it returns, and the budget math."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from layerprune.errors import UserError
from layerprune.models.adapter import ModelAdapter

log = logging.getLogger("layerprune")


@dataclass
class AllocContext:
    """What an allocator may read. Expensive inputs are lazy and computed at most once per run.

    ``dense_stats(need="full")`` runs the shared dense calibration sweep (DLP, OWL; ``need="mean"``: only the
    means are read, which a cheaper sweep gives); ``calib()`` returns the
    calibration ``input_ids``; ``extra`` carries run settings (device, pruner, pruner options, batch
    size, progress, seqlen, SV ids); ``allow_long`` is the user's consent to a run estimated to take
    over an hour (the CLI's ``--yes``): a run setting, not a method option, so it never enters a cache key.
    """

    adapter: ModelAdapter
    dense_stats: Callable[..., Any] = lambda need="full": None
    calib: Callable[[], Any] = lambda: None
    extra: dict = field(default_factory=dict)
    allow_long: bool = False


@dataclass
class Allocation:
    """Per-block sparsities (parameter-weighted over the block's linears), per-linear sparsities, and
    the method's diagnostics. ``nm`` holds a per-block N for mixed N:M, else ``None``."""

    method: str
    target: float
    per_block: list[float]
    per_linear: dict[str, float]
    diagnostics: dict = field(default_factory=dict)
    nm: list[int] | None = None
    m: int = 0

    def to_json(self) -> dict:
        return {"method": self.method, "target": self.target, "per_block": self.per_block,
                "per_linear": self.per_linear, "diagnostics": self.diagnostics, "nm": self.nm, "m": self.m}

    @classmethod
    def from_json(cls, d: dict) -> "Allocation":
        return cls(d["method"], d["target"], d["per_block"], d["per_linear"], d.get("diagnostics", {}),
                   d.get("nm"), d.get("m", 0))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float((values * weights).sum() / weights.sum())


def clip_and_restore(s: np.ndarray, weights: np.ndarray, target: float, lo: float = 0.0, hi: float = 0.99,
                     max_iter: int | None = None) -> np.ndarray:
    """Clip to [lo, hi], then shift the unclipped entries by one common constant so that the
    ``weights``-weighted mean equals ``target``; repeat until no new entry clips (≤ n passes)."""
    if not (lo <= target <= hi):
        raise UserError(f"target sparsity {target} cannot be met with per-layer sparsities in [{lo}, {hi}]")
    s = np.asarray(s, dtype=np.float64).copy()
    w = np.asarray(weights, dtype=np.float64)
    fixed = np.zeros(len(s), dtype=bool)
    for _ in range(max_iter or len(s) + 1):
        s = np.clip(s, lo, hi)
        fixed |= (s <= lo) | (s >= hi)
        deficit = target * w.sum() - (s * w).sum()
        if abs(deficit) < 1e-12 * w.sum():
            break
        free = ~fixed if (~fixed).any() else np.ones(len(s), dtype=bool)
        s[free] += deficit / w[free].sum()
        if ((s[free] >= lo) & (s[free] <= hi)).all():
            break
        # entries that would leave [lo, hi] clip in the next pass; the others absorb the rest
    return np.clip(s, lo, hi)


def minmax(x: np.ndarray) -> np.ndarray | None:
    """Min-max scale to [0, 1]; ``None`` when all values are equal (the caller falls back to uniform)."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min()
    if not np.isfinite(span) or span <= 0:
        return None
    return (x - x.min()) / span


def expand_blocks(adapter: ModelAdapter, per_block: list[float]) -> dict[str, float]:
    """Give every linear of block l the block's sparsity (the papers' block granularity)."""
    return {adapter.full_name(i, n): float(per_block[i]) for i in range(adapter.n_blocks) for n in adapter.linear_names[i]}


def block_means(adapter: ModelAdapter, per_linear: dict[str, float]) -> list[float]:
    out = []
    for i in range(adapter.n_blocks):
        lin = adapter.linears(i)
        num = sum(per_linear[adapter.full_name(i, n)] * m.weight.numel() for n, m in lin.items())
        out.append(num / sum(m.weight.numel() for m in lin.values()))
    return out


def finish(method: str, adapter: ModelAdapter, target: float, per_block: list[float] | None = None,
           per_linear: dict[str, float] | None = None, lo: float = 0.0, hi: float = 0.99,
           diagnostics: dict | None = None) -> Allocation:
    """Clip-and-restore at the granularity given, then fill the other view."""
    if per_linear is None:
        assert per_block is not None
        w = np.array(adapter.block_sizes(), dtype=np.float64)
        pb = clip_and_restore(np.array(per_block), w, target, lo, hi)
        per_linear = expand_blocks(adapter, pb.tolist())
    else:
        names = list(per_linear)
        sizes = adapter.linear_sizes()
        pl = clip_and_restore(np.array([per_linear[n] for n in names]), np.array([sizes[n] for n in names], float), target, lo, hi)
        per_linear = dict(zip(names, pl.tolist()))
    return Allocation(method, target, block_means(adapter, per_linear), per_linear, diagnostics or {})


def band_from_importance(importance: np.ndarray, target: float, width: float) -> np.ndarray | None:
    """OWL/DLP-style band: higher importance → lower sparsity, spread ``width``, mean = target
    (unweighted). Returns ``None`` for a flat profile."""
    mm = minmax(importance)
    if mm is None:
        return None
    d = width * mm
    return target - (d - d.mean())


def mixed_nm(per_block: list[float], weights: list[int], n: int, m: int) -> list[int]:
    """Per-block N for a global N:M target: round ``s_l·m`` to integers in [0, m-1] with the
    largest-remainder rule so that the weighted mean N equals ``n`` as closely as integers allow."""
    s = np.asarray(per_block) * m
    w = np.asarray(weights, dtype=np.float64)
    base = np.clip(np.floor(s), 0, m - 1).astype(int)
    need = int(round(n * w.sum() / w.mean())) - int(round((base * w).sum() / w.mean()))
    order = np.argsort(-(s - np.floor(s)), kind="stable")
    for idx in order:
        if need <= 0:
            break
        if base[idx] < m - 1:
            base[idx] += 1
            need -= 1
    return base.tolist()
