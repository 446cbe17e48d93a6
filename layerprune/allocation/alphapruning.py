"""AlphaPruning (Lu et al., NeurIPS 2024; methods_dlp.md §3): heavy-tailed self-regularisation.

Data-free. For every linear, the eigenvalues λ = σ² of WᵀW (fp32 SVD, on the accelerator when there
is one) are fitted with a power law; PL_Alpha_Hill (``alpha_peak``) is the Hill estimate
α_i = 1 + n / (Σ_{k≥i} ln λ_k − n ln λ_i) at the x_min candidate i with the smallest
Kolmogorov–Smirnov distance D_i = max_k |1 − (λ_k/λ_i)^{1−α_i} − k/n|. The candidates lie in a
window around the peak of a 100-bin histogram of log10 λ: the released code compares linear
eigenvalues against log10(0.95·peak) below and 1.5·peak above (``xmin_window="code"``, default,
§8 B1); ``"intended"`` uses [0.95·peak, 1.5·peak].

Mapping (§3.2): block-wise mean of the alphas (``mapping="block_wise"``), r = 1−ε + 2ε·minmax(α),
scaled by c = p·Σn / Σ(n·r) so the parameter-weighted mean is p. Larger α → more sparsity. The code
has no clamp; layerprune clamps to [0, 0.99] with restore and warns when that changed anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from layerprune.allocation.common import AllocContext, Allocation, block_means, clip_and_restore
from layerprune.options import option
from layerprune.specs import AllocatorSpec

log = logging.getLogger("layerprune")


def hill_alpha(eigs: torch.Tensor, bins: int = 100, xmin_window: str = "code") -> tuple[float, float]:
    """PL_Alpha_Hill of an eigenvalue spectrum. Returns ``(alpha, ks_distance)``."""
    e = torch.sort(eigs.double().flatten())[0]
    N = e.numel()
    log_e = torch.log(e)
    h = torch.log10(e)
    counts = torch.histc(h, bins, min=float(h.min()), max=float(h.max()))
    edges = torch.linspace(float(h.min()), float(h.max()), bins + 1, dtype=torch.float64)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    xmin_min = np.log10(0.95 * peak) if xmin_window == "code" else 0.95 * peak
    xmin_max = 1.5 * peak
    cand = [i for i in range(N - 1) if xmin_min <= float(e[i]) <= xmin_max]
    if not cand:
        cand = list(range(N - 1))
    suffix = torch.flip(torch.cumsum(torch.flip(log_e, [0]), 0), [0])  # Σ_{k≥i} ln λ_k
    best = (float("inf"), 1.0)
    for i in cand:
        n = N - i
        alpha = 1 + n / float(suffix[i] - n * log_e[i])
        if alpha <= 1:
            continue
        seq = torch.arange(n, dtype=torch.float64)
        D = float(torch.max(torch.abs(1 - (e[i:] / e[i]) ** (1 - alpha) - seq / n)))
        if D < best[0]:
            best = (D, alpha)
    return best[1], best[0]


def layer_alphas(ctx: AllocContext, xmin_window: str = "code") -> dict[str, float]:
    dev = ctx.extra.get("device", torch.device("cpu"))
    out = {}
    for i, n, lin in ctx.adapter.all_linears():
        W = lin.weight.data.to(dev, torch.float32)
        eigs = torch.linalg.svdvals(W) ** 2
        out[ctx.adapter.full_name(i, n)] = hill_alpha(eigs.cpu(), xmin_window=xmin_window)[0]
    return out


def alphapruning_sparsities(alphas: np.ndarray, sizes: np.ndarray, target: float, epsilon: float) -> np.ndarray:
    """r = (α − min)/(max − min)·2ε + (1 − ε); s = r · p·Σn/Σ(n·r) (parameter-weighted mean p)."""
    span = alphas.max() - alphas.min()
    r = np.ones_like(alphas) if span <= 0 else (alphas - alphas.min()) / span * (2 * epsilon) + (1 - epsilon)
    return r * (target * sizes.sum() / (sizes * r).sum())


@dataclass(frozen=True)
class AlphaPruningOptions:
    epsilon: float = option(0.3, "AlphaPruning ε: sparsities span [1−ε, 1+ε]·p before rescaling",
                            check=lambda v: 0 < v < 1, must="in (0, 1); the default is 0.3")
    mapping: str = option("block_wise", "AlphaPruning: mean α per block, or per linear", flag="--mapping-type",
                          choices=("block_wise", "layer_wise"))
    xmin_window: str = option("code", "AlphaPruning x_min window: released code's, or the intended one",
                              choices=("code", "intended"))


def allocate_alphapruning(ctx: AllocContext, target: float, options: AlphaPruningOptions | None = None) -> Allocation:
    o = options or AlphaPruningOptions()
    epsilon, mapping, xmin_window = o.epsilon, o.mapping, o.xmin_window
    alphas = layer_alphas(ctx, xmin_window)
    names = list(alphas)
    a = np.array([alphas[n] for n in names])
    if mapping == "block_wise":
        blocks = [ctx.adapter.full_name(i, "")[:-1] for i in range(ctx.adapter.n_blocks)]
        for i, prefix in enumerate(blocks):
            idx = [k for k, n in enumerate(names) if n.startswith(prefix + ".")]
            a[idx] = a[idx].mean()
    sizes_d = ctx.adapter.linear_sizes()
    sizes = np.array([sizes_d[n] for n in names], dtype=np.float64)
    s = alphapruning_sparsities(a, sizes, target, epsilon)
    clipped = bool((s > 0.99).any() or (s < 0).any())
    if clipped:
        log.warning("AlphaPruning: some layer sparsities left [0, 0.99]; clamped and renormalised (the code has no clamp)")
        s = clip_and_restore(s, sizes, target, 0.0, 0.99)
    per_linear = dict(zip(names, s.tolist()))
    diag = {"epsilon": epsilon, "mapping": mapping, "xmin_window": xmin_window, "alpha": alphas, "clamped": clipped}
    return Allocation("alphapruning", target, block_means(ctx.adapter, per_linear), per_linear, diag)


SPEC = AllocatorSpec("alphapruning", AlphaPruningOptions, fn=allocate_alphapruning, needs_calibration=False,
                     doc="heavy-tailed self-regularisation, PL_Alpha_Hill (Lu et al., NeurIPS 2024)")
