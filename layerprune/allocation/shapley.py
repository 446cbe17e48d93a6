"""Pure Shapley math over any game ``v(coalition) -> float`` (players are 0..n-1 positions).

φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! · (v(S ∪ {i}) − v(S))      (exact, 2^n evaluations)

SWSV (SV-NUP's sliding-window Shapley value, methods_svnup.md §1.5): exact Shapley inside windows
of w consecutive players with every other player held at the background state; each player takes
the value from the window centred on it (``aggregate="center"``, edges shifted inward) or the mean
over all stride-1 windows containing it (``"mean"``); ``stride=w`` partitions instead.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Callable, Iterable

import numpy as np


def shapley_weight(s: int, n: int, kind: str = "shapley") -> float:
    """Weight of a coalition of size ``s`` (not containing i) among ``n`` players."""
    if kind == "uniform":
        return 1.0 / 2 ** (n - 1)
    return math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)


def exact_shapley(n: int, v: Callable[[frozenset], float], weights: str = "shapley") -> np.ndarray:
    """Exact Shapley values of an ``n``-player game; ``v`` is called once per coalition (2^n)."""
    table = {frozenset(c): v(frozenset(c)) for r in range(n + 1) for c in itertools.combinations(range(n), r)}
    return shapley_from_table(n, table, weights)


def shapley_from_table(n: int, table: dict[frozenset, float], weights: str = "shapley") -> np.ndarray:
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            w = shapley_weight(r, n, weights)
            for c in itertools.combinations(others, r):
                S = frozenset(c)
                phi[i] += w * (table[S | {i}] - table[S])
    return phi


def monte_carlo_shapley(n: int, v: Callable[[frozenset], float], permutations: int = 200, seed: int = 0) -> np.ndarray:
    """Permutation Monte-Carlo estimate (Castro et al. 2009); ``v`` should be memoised by the caller."""
    rng = random.Random(seed)
    phi = np.zeros(n)
    for _ in range(permutations):
        order = list(range(n))
        rng.shuffle(order)
        S: frozenset = frozenset()
        prev = v(S)
        for p in order:
            S2 = S | {p}
            cur = v(S2)
            phi[p] += cur - prev
            S, prev = S2, cur
    return phi / permutations


def window_starts(n: int, w: int, stride: int = 1) -> list[int]:
    """Distinct windows: stride 1 → n−w+1 windows; stride w → a partition, the last shifted inward."""
    if stride == 1:
        return list(range(n - w + 1))
    starts = list(range(0, n, stride))
    return sorted({min(s, n - w) for s in starts})


def centre_start(i: int, n: int, w: int) -> int:
    return min(max(i - w // 2, 0), n - w)


def swsv_evaluations(n: int, w: int, stride: int = 1, shared: bool = True) -> int:
    """E(L, w) = (L − w + 1)(2^w − 1) + 1 for stride-1 windows with one pattern shared by all windows."""
    k = len(window_starts(n, w, stride))
    return k * (2**w - 1) + 1 if shared else k * 2**w


def swsv(n: int, w: int, v_window: Callable[[int, frozenset], float], aggregate: str = "center",
         stride: int = 1, shared_pattern: frozenset | None = None, weights: str = "shapley",
         on_window: Callable[[int], None] | None = None) -> tuple[np.ndarray, int, dict[int, np.ndarray]]:
    """Sliding-window Shapley values.

    ``v_window(start, members)`` is the payoff with players ``members`` (absolute indices inside the
    window starting at ``start``) present, the window's other players absent, every other player at
    the background state. ``shared_pattern`` (relative positions, e.g. all present) names the one
    pattern whose model is the same for every window: it is evaluated once. Returns
    ``(phi, evaluations, local values per window start)``.
    """
    if not (1 <= w <= n):
        raise ValueError(f"window {w} must be between 1 and the number of players {n}")
    starts = window_starts(n, w, stride)
    shared_value: float | None = None
    evals = 0
    local: dict[int, np.ndarray] = {}
    for st in starts:
        table: dict[frozenset, float] = {}
        for r in range(w + 1):
            for c in itertools.combinations(range(w), r):
                rel = frozenset(c)
                if shared_pattern is not None and rel == shared_pattern and shared_value is not None:
                    table[rel] = shared_value
                    continue
                val = v_window(st, frozenset(st + j for j in rel))
                evals += 1
                if shared_pattern is not None and rel == shared_pattern:
                    shared_value = val
                table[rel] = val
        local[st] = shapley_from_table(w, table, weights)
        if on_window:
            on_window(st)
    phi = np.zeros(n)
    if aggregate == "center" and stride == 1:
        for i in range(n):
            st = centre_start(i, n, w)
            phi[i] = local[st][i - st]
    else:
        cnt = np.zeros(n)
        for st, vals in local.items():
            for j in range(w):
                phi[st + j] += vals[j]
                cnt[st + j] += 1
        if aggregate == "center":  # partition: every player is in exactly one (or two, at the shifted edge) windows
            pass
        phi /= np.maximum(cnt, 1)
    return phi, evals, local


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for val in np.unique(x):
            idx = np.where(x == val)[0]
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(np.asarray(list(a), float)), ranks(np.asarray(list(b), float))
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0
