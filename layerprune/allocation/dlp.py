"""DLP — Dynamic Layerwise Pruning (Chen et al., ICML 2025, arXiv 2505.23807; methods_dlp.md §1).

Per block l, the unimportance S_l is a statistic of the concatenated Wanda scores A = |W|·‖X‖₂ of
all the block's linears, on dense-model activations (§1.3): the **median** (paper, default) or the
mean (released code, ``stat="mean"``). Then (§1.4)::

    I_l = 1 − S_l / Σ_k S_k                       (relative importance)
    d_l = 2α · (I_l − min I) / (max I − min I)     (min-max onto [0, 2α])
    s_l = p + mean(d) − d_l                        (centre on the target: R_j = p + m − d_j)

so blocks with larger S are pruned more; the band is exactly 2α wide and located at
[p + m − 2α, p + m] (not [p − α, p + α], §8 A3). Sparsities are clamped to [0.01, 0.99] and the
unclamped blocks shifted so the parameter-weighted mean stays p (the code only maps s ≤ 0 to 0.01).
Equal S in every block → uniform, with a warning. ``granularity="linear"`` applies the same mapping
to per-linear statistics (an option; the papers allocate per block).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from layerprune.allocation.common import AllocContext, Allocation, finish
from layerprune.options import option
from layerprune.specs import AllocatorSpec

log = logging.getLogger("layerprune")


def dlp_sparsities(S: np.ndarray, target: float, alpha: float) -> tuple[np.ndarray, dict]:
    """Pure DLP mapping (Eq. for I, d, R above) before clamping. Returns sparsities and diagnostics."""
    S = np.asarray(S, dtype=np.float64)
    I = 1.0 - S / S.sum()
    span = I.max() - I.min()
    if not np.isfinite(span) or span <= 0:
        log.warning("DLP: every block has the same statistic; falling back to uniform sparsity")
        return np.full(len(S), target), {"degenerate": True, "importance": I.tolist()}
    d = 2 * alpha * (I - I.min()) / span
    s = target + d.mean() - d
    return s, {"degenerate": False, "importance": I.tolist(), "d": d.tolist(), "m": float(d.mean())}


@dataclass(frozen=True)
class DLPOptions:
    alpha: float = option(0.15, "DLP band half-width α (the band 2α spans the per-block sparsities)",
                          check=lambda v: 0 < v < 0.5,
                          must="in (0, 0.5): the band 2*alpha must fit inside [0, 1); the paper uses 0.15")
    stat: str = option("median", "DLP statistic of the Wanda scores: median (paper) or mean (released code)",
                       choices=("median", "mean"))
    granularity: str = option("block", "one ratio per block (papers) or per linear", choices=("block", "linear"))


def allocate_dlp(ctx: AllocContext, target: float, options: DLPOptions | None = None) -> Allocation:
    o = options or DLPOptions()
    alpha, stat, granularity = o.alpha, o.stat, o.granularity
    stats = ctx.dense_stats("mean" if stat == "mean" else "full")
    if granularity == "block":
        S = np.array([b[stat] for b in stats.per_block])
        s, diag = dlp_sparsities(S, target, alpha)
        diag.update(statistic=stat, S=S.tolist(), alpha=alpha, unclamped=s.tolist())
        return finish("dlp", ctx.adapter, target, per_block=s.tolist(), lo=0.01, hi=0.99, diagnostics=diag)
    names = list(stats.per_linear)
    S = np.array([stats.per_linear[n][stat] for n in names])
    s, diag = dlp_sparsities(S, target, alpha)
    diag.update(statistic=stat, alpha=alpha, granularity="linear")
    return finish("dlp", ctx.adapter, target, per_linear=dict(zip(names, s.tolist())), lo=0.01, hi=0.99,
                  diagnostics=diag)


SPEC = AllocatorSpec("dlp", DLPOptions, fn=allocate_dlp, supports_nm=True, target_range=(0.01, 0.99),
                     doc="Dynamic Layerwise Pruning (Chen et al., ICML 2025)")
