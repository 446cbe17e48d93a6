"""OWL — Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024; methods_dlp.md §2).

Layerwise outlier distribution (§2.1): D_l = 100 · #{A > M·mean(A)} / numel(A) over the block's
concatenated Wanda scores (strict ">"). Mapping (§2.2): t_l = 2λ·minmax(D), s_l = p − (t_l − mean t),
so outlier-rich blocks are pruned less; clamp [0.01, 0.99] with restore (the code maps s ≤ 0 to 0.01).
Defaults M = 5, λ = 0.08 (OWL README and DLP's run.py; OWL's main.py has M = 3, §8 B4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layerprune.allocation.common import AllocContext, Allocation, band_from_importance, finish
from layerprune.allocation.stats import OUTLIER_MS
from layerprune.options import option
from layerprune.specs import AllocatorSpec


def owl_sparsities(D: np.ndarray, target: float, lam: float) -> np.ndarray:
    s = band_from_importance(np.asarray(D, dtype=np.float64), target, 2 * lam)
    return np.full(len(D), target) if s is None else s


@dataclass(frozen=True)
class OWLOptions:
    lam: float = option(0.08, "OWL / SV-NUP band half-width λ (sparsities span 2λ)", check=lambda v: 0 < v < 0.5,
                        must="in (0, 0.5); OWL's README uses 0.08")
    M: float = option(5.0, "OWL outlier threshold M (A > M·mean A)", check=lambda v: float(v) in OUTLIER_MS,
                      must="one of " + ", ".join(str(int(m)) for m in OUTLIER_MS) + "; the default is 5")
    granularity: str = option("block", "one ratio per block (papers) or per linear", choices=("block", "linear"))


def allocate_owl(ctx: AllocContext, target: float, options: OWLOptions | None = None) -> Allocation:
    o = options or OWLOptions()
    M, lam, granularity = float(o.M), o.lam, o.granularity
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


SPEC = AllocatorSpec("owl", OWLOptions, fn=allocate_owl, supports_nm=True, target_range=(0.01, 0.99),
                     doc="Outlier-Weighed Layerwise sparsity (Yin et al., ICML 2024)")
