"""Dense-model statistics of the Wanda scores A = |W|·‖X‖₂ that DLP and OWL read (methods_dlp.md §1.3, §2.1).

One dense sweep through the engine (``engine.sequential.dense_sweep``) feeds a Wanda accumulator per
linear; each block's scores give the lower median, the mean and the outlier ratios
``#{A > M·mean(A)} / numel`` for every M in ``OUTLIER_MS``, per block (concatenated) and per linear.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from layerprune.engine.sequential import dense_sweep
from layerprune.models.adapter import ModelAdapter
from layerprune.pruners.wanda import WandaPruner


@dataclass
class DenseStats:
    """Per-block (and per-linear) statistics of the Wanda scores |W|·‖X‖ on the dense model."""

    per_block: list[dict]
    per_linear: dict[str, dict]
    nsamples: int
    seconds: float

    def to_json(self) -> dict:
        return {"per_block": self.per_block, "per_linear": self.per_linear, "nsamples": self.nsamples,
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "DenseStats":
        pb = [{**b, "outlier": {float(k): v for k, v in b["outlier"].items()}} for b in d["per_block"]]
        pl = {n: {**v, "outlier": {float(k): x for k, x in v["outlier"].items()}} for n, v in d["per_linear"].items()}
        return cls(pb, pl, d["nsamples"], d["seconds"])


OUTLIER_MS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)


def lower_median(x: torch.Tensor | list[torch.Tensor]) -> float:
    """The lower median (``torch.median`` convention) of ``x`` or of the concatenation of the tensors in it:
    the ⌈n/2⌉-th smallest value, exact. Non-negative float32 scores (Wanda's) go through
    :func:`kth_nonneg` (a histogram select: no sort of everything, no concatenated copy); else ``kthvalue``."""
    parts = [t.flatten() for t in (x if isinstance(x, (list, tuple)) else [x])]
    k = (sum(t.numel() for t in parts) + 1) // 2
    if all(t.dtype == torch.float32 for t in parts) and all(bool((t >= 0).all()) for t in parts):
        return kth_nonneg(parts, k)
    return float(torch.kthvalue(torch.cat(parts) if len(parts) > 1 else parts[0], k).values)


def kth_nonneg(parts: list[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest (1-based) of non-negative float32 tensors taken together.

    Non-negative IEEE floats order like their bit patterns read as integers, so one ``bincount`` of the top
    16 bits (sign, exponent, 7 mantissa bits) finds the bucket that holds the ``k``-th value; only that
    bucket's values (a relative width of 2⁻⁷) are then sorted. Two passes over the data, one part's keys
    at a time, instead of a sort of all of it (a 7B block's 200 M scores: milliseconds on the GPU)."""
    hist = None
    for t in parts:
        h = torch.bincount(_bucket(t), minlength=1 << 15)
        hist = h if hist is None else hist + h
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device, dtype=cum.dtype)))
    below = int(cum[b - 1]) if b > 0 else 0
    cand = torch.cat([t[_bucket(t) == b] for t in parts])
    return float(torch.sort(cand).values[k - below - 1])


def _bucket(t: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of each float32's pattern with the sign cleared (−0.0 falls in +0.0's bucket)."""
    return (t.view(torch.int32) & 0x7FFFFFFF) >> 16


def score_stats(scores: torch.Tensor | list[torch.Tensor], ms: tuple[float, ...]) -> dict:
    """Lower median, mean and outlier ratios ``#{A > M·mean}/numel`` of ``scores`` (a tensor, or tensors
    taken together)."""
    parts = [t.flatten() for t in (scores if isinstance(scores, (list, tuple)) else [scores])]
    n = sum(t.numel() for t in parts)
    mean = float(sum(t.sum(dtype=torch.float64) for t in parts) / n)
    return {"median": lower_median(parts), "mean": mean,
            "outlier": {m: float(sum((t > m * mean).sum() for t in parts)) / n for m in ms}}


def dense_stats_pass(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor, device: torch.device,
                     batch_size: int = 8, offload: str = "auto", ms: tuple[float, ...] = OUTLIER_MS,
                     progress: bool = True, weights: object = None) -> DenseStats:
    """The dense sweep with Wanda accumulators: per block and per linear, the statistics of A = |W|·‖X‖.

    A block's scores are built on the accelerator and its statistics (exact lower median, mean, outlier
    ratios ``#{A > M·mean(A)}/numel``) taken there, per linear and over the block's linears together
    (without concatenating them); a block's scores take 4 bytes per weight.
    """
    t0 = time.perf_counter()
    per_block: list[dict] = []
    per_linear: dict[str, dict] = {}

    def on_block(i: int, linears: dict, acc: dict) -> None:
        parts = []
        for n, a in acc.items():
            sc = a.score()
            per_linear[adapter.full_name(i, n)] = score_stats(sc, ms)
            parts.append(sc)
            a.free()
        per_block.append(score_stats(parts, ms))

    dense_sweep(model, adapter, calib_ids, device, lambda i, lins: {n: WandaPruner(lin) for n, lin in lins.items()},
                on_block, batch_size, offload, progress, desc="dense stats", weights=weights)
    return DenseStats(per_block, per_linear, int(calib_ids.shape[0]), time.perf_counter() - t0)
