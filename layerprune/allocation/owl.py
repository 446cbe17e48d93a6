"""OWL — Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024; methods_dlp.md §2).

Layerwise outlier distribution (§2.1): D_l = 100 · #{A > M·mean(A)} / numel(A) over the block's
concatenated Wanda scores (strict ">"). Mapping (§2.2): t_l = 2λ·minmax(D), s_l = p − (t_l − mean t),
so outlier-rich blocks are pruned less; clamp [0.01, 0.99] with restore (the code maps s ≤ 0 to 0.01).
Defaults M = 5, λ = 0.08 (OWL README and DLP's run.py; OWL's main.py has M = 3, §8 B4).
"""

from __future__ import annotations

import numpy as np

from layerprune.allocation.common import AllocContext, Allocation, band_from_importance, finish
from layerprune.engine.sequential import OUTLIER_MS
from layerprune.errors import UserError


def owl_sparsities(D: np.ndarray, target: float, lam: float) -> np.ndarray:
    s = band_from_importance(np.asarray(D, dtype=np.float64), target, 2 * lam)
    return np.full(len(D), target) if s is None else s


def allocate_owl(ctx: AllocContext, target: float, M: float = 5.0, lam: float = 0.08,
                 granularity: str = "block", **_: object) -> Allocation:
    if not (0 < lam < 0.5):
        raise UserError(f"OWL lambda must be in (0, 0.5) (got {lam}); the README uses 0.08")
    if float(M) not in OUTLIER_MS:
        raise UserError(f"OWL M must be one of {', '.join(str(int(m)) for m in OUTLIER_MS)} (got {M}); the default is 5")
    if not (0.01 <= target <= 0.99):
        raise UserError(f"OWL needs a target sparsity in [0.01, 0.99] (got {target})")
    stats = ctx.dense_stats()
    if granularity == "block":
        D = np.array([100 * b["outlier"][float(M)] for b in stats.per_block])
        s = owl_sparsities(D, target, lam)
        return finish("owl", ctx.adapter, target, per_block=s.tolist(), lo=0.01, hi=0.99,
                      diagnostics={"M": M, "lambda": lam, "lod_percent": D.tolist(), "unclamped": s.tolist()})
    names = list(stats.per_linear)
    D = np.array([100 * stats.per_linear[n]["outlier"][float(M)] for n in names])
    s = owl_sparsities(D, target, lam)
    return finish("owl", ctx.adapter, target, per_linear=dict(zip(names, s.tolist())), lo=0.01, hi=0.99,
                  diagnostics={"M": M, "lambda": lam, "granularity": "linear"})
