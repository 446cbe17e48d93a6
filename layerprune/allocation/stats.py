"""Dense-model statistics of the Wanda scores A = |W|·‖X‖₂ that DLP and OWL read (methods_dlp.md §1.3, §2.1).

One dense sweep through the engine (``engine.sequential.dense_sweep``) feeds a Wanda accumulator per
linear; each block's scores give the lower median, the mean and the outlier ratios
``#{A > M·mean(A)} / numel`` for every M in ``OUTLIER_MS``, per block (concatenated) and per linear; or, when
the allocation reads only the means (DLP with the released code's ``stat="mean"``), the means alone
(``what="mean"``: the same float64 sums, so the same values, without the selects and counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from layerprune.distributed import all_reduce_sum, deal, rank, world_size
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
    split: dict = field(default_factory=dict)  # the sweep's parts (engine.sequential.dense_sweep), seconds
    what: str = "full"  # "full": median, mean and outlier ratios; "mean": the means only

    def to_json(self) -> dict:
        return {"per_block": self.per_block, "per_linear": self.per_linear, "nsamples": self.nsamples,
                "seconds": self.seconds, "split": self.split, "what": self.what}

    @classmethod
    def from_json(cls, d: dict) -> "DenseStats":
        def row(v: dict) -> dict:
            return {**v, "outlier": {float(k): x for k, x in v["outlier"].items()}} if "outlier" in v else dict(v)

        return cls([row(b) for b in d["per_block"]], {n: row(v) for n, v in d["per_linear"].items()}, d["nsamples"],
                   d["seconds"], d.get("split", {}), d.get("what", "full"))


OUTLIER_MS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)


# Radix-select digits of a non-negative float32's bit pattern: (shift, width). Such floats order like their
# bit patterns read as integers, so the k-th value is found digit by digit: the top 12 bits below the sign
# (exponent and 3 mantissa bits; 4096 bins, which torch's bincount counts in shared memory: 3.7 ms for a 7B
# block's 200 M scores on the H200, against 26 ms for 15 bits in global memory; bench/results/probe_stats_h200.json), then 12 and 7 more bits
# among the values still in the race.
DIGITS = ((19, 12), (7, 12), (0, 7))


def _digit(t: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    return (t.view(torch.int32) >> shift) & ((1 << width) - 1)  # the sign bit never enters a digit (−0.0 = +0.0)


def digit_hist(parts: list[torch.Tensor], shift: int, width: int, device: torch.device) -> torch.Tensor:
    """Counts of one digit's values over the float32 tensors ``parts`` (int64, 2**width bins)."""
    h = torch.zeros(1 << width, dtype=torch.int64, device=device)
    for t in parts:
        if t.numel():
            h += torch.bincount(_digit(t.reshape(-1), shift, width), minlength=1 << width)
    return h


def _noop(t: torch.Tensor) -> torch.Tensor:
    return t


def kth_nonneg(parts: list[torch.Tensor], k: int, reduce: Callable[[torch.Tensor], torch.Tensor] = _noop,
               first: torch.Tensor | None = None, device: torch.device | None = None) -> float:
    """The exact ``k``-th smallest (1-based) of non-negative float32 tensors taken together: a radix select
    over :data:`DIGITS` (per digit one ``bincount`` of the candidates still in the race, then only the
    values in the chosen bin stay). A 7B block's 200 M scores: two passes over the data, no sort, no copy.

    ``first``: the first digit's histogram of ``parts`` when the caller has it (a block's is the sum of its
    linears'). ``reduce`` sums each histogram over data-parallel ranks, each of which holds a share of the
    parts (an empty share is fine): every rank gets the same value."""
    device = device or (parts[0].device if parts else torch.device("cpu"))
    cand = [t.reshape(-1) for t in parts]
    bits = 0
    for level, (shift, width) in enumerate(DIGITS):
        h = first.clone() if level == 0 and first is not None else digit_hist(cand, shift, width, device)
        cum = reduce(h).cumsum(0)
        if k < 1 or k > int(cum[-1]):
            raise ValueError(f"k={k} outside 1..{int(cum[-1])}")
        d = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device, dtype=cum.dtype)))
        k -= int(cum[d - 1]) if d > 0 else 0
        bits |= d << shift
        if level + 1 < len(DIGITS):
            cand = [t[_digit(t, shift, width) == d] for t in cand]
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def score_mean(parts: list[torch.Tensor], numel: int, reduce: Callable[[torch.Tensor], torch.Tensor] = _noop,
               device: torch.device | None = None) -> torch.Tensor:
    """The mean of the tensors ``parts`` taken together, as a float64 tensor of one element: their float64
    sums added in order, summed over the ranks by ``reduce``, divided by ``numel`` (all ranks' elements)."""
    total = torch.zeros(1, dtype=torch.float64, device=device or (parts[0].device if parts else torch.device("cpu")))
    for t in parts:
        total += t.sum(dtype=torch.float64)
    return reduce(total) / numel


def score_stats(scores: torch.Tensor | list[torch.Tensor], ms: tuple[float, ...],
                reduce: Callable[[torch.Tensor], torch.Tensor] = _noop, first: torch.Tensor | None = None,
                numel: int | None = None, device: torch.device | None = None) -> dict:
    """Lower median, mean and outlier ratios ``#{A > M·mean}/numel`` of ``scores`` (a tensor, or tensors
    taken together). Data-parallel: ``scores`` is this rank's share, ``reduce`` sums over the ranks and
    ``numel`` counts all shares; ``first`` as in :func:`kth_nonneg`."""
    parts = [t.reshape(-1) for t in (scores if isinstance(scores, (list, tuple)) else [scores])]
    device = device or (parts[0].device if parts else torch.device("cpu"))
    n = numel if numel is not None else sum(t.numel() for t in parts)
    mean = score_mean(parts, n, reduce, device)
    # thresholds rounded to float32 as ``t > m * mean`` with a Python float would round them
    thr = (mean * torch.tensor(ms, dtype=torch.float64, device=device)).float()
    # #{A > thr} = the values in bins above thr's first digit (the histogram) + those in thr's bin above it
    # (a pass that keeps only the values in the thresholds' bins, the few outliers' region)
    shift, width = DIGITS[0]
    h = first if first is not None else digit_hist(parts, shift, width, device)
    above = torch.cat([h.flip(0).cumsum(0).flip(0), h.new_zeros(1)])  # above[d] = #values in bins ≥ d
    tb = _digit(thr, shift, width).long()
    counts = above[tb + 1]
    lut = torch.zeros(1 << width, dtype=torch.bool, device=device)
    lut[tb] = True
    for t in parts:
        c = t[lut[_digit(t, shift, width)]]
        cd = _digit(c, shift, width).long()
        counts = counts + ((cd.unsqueeze(1) == tb) & (c.unsqueeze(1) > thr)).sum(0)
    counts = reduce(counts).tolist()
    return {"median": kth_nonneg(parts, (n + 1) // 2, reduce, h, device), "mean": float(mean),
            "outlier": {m: c / n for m, c in zip(ms, counts)}}


def block_stats(linears: dict[str, nn.Linear], acc: dict[str, WandaPruner],
                ms: tuple[float, ...] = OUTLIER_MS, what: str = "full") -> tuple[dict[str, dict], dict]:
    """One block's statistics from its Wanda accumulators: per linear and over the block's linears together
    (``what="mean"``: the means only). Data-parallel: the linears are dealt over the ranks (each rank holds
    every Σx² after the sweep's all_reduce); a rank scores its share, and the per-linear rows and the block's
    histograms, sums and counts are summed over the ranks. The accumulators are freed."""
    names = list(acc)
    dev = linears[names[0]].weight.device
    owner = deal([float(linears[n].weight.numel()) for n in names], world_size())
    mine = [n for n, r in zip(names, owner) if r == rank()]
    scores = {n: acc[n].score() for n in mine}
    for a in acc.values():
        a.free()
    if what == "mean":
        means = torch.zeros(len(names), dtype=torch.float64, device=dev)
        for n in mine:
            means[names.index(n)] = score_mean([scores[n]], scores[n].numel())
        numel = sum(linears[n].weight.numel() for n in names)
        blk = score_mean(list(scores.values()), numel, all_reduce_sum, dev)
        return ({n: {"mean": m} for n, m in zip(names, all_reduce_sum(means).tolist())}, {"mean": float(blk)})
    rows = torch.zeros(len(names), 2 + len(ms), dtype=torch.float64, device=dev)
    first = torch.zeros(1 << DIGITS[0][1], dtype=torch.int64, device=dev)
    for n in mine:
        h = digit_hist([scores[n]], *DIGITS[0], dev)
        st = score_stats(scores[n], ms, first=h)
        rows[names.index(n)] = torch.tensor([st["median"], st["mean"], *st["outlier"].values()], dtype=torch.float64)
        first += h
    per_linear = {n: {"median": row[0], "mean": row[1], "outlier": dict(zip(ms, row[2:]))}
                  for n, row in zip(names, all_reduce_sum(rows).tolist())}
    blk = score_stats(list(scores.values()), ms, all_reduce_sum, first, sum(linears[n].weight.numel() for n in names), dev)
    return per_linear, blk


def dense_stats_pass(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor, device: torch.device,
                     batch_size: int = 8, offload: str = "auto", ms: tuple[float, ...] = OUTLIER_MS,
                     progress: bool = True, weights: object = None, what: str = "full") -> DenseStats:
    """The dense sweep with Wanda accumulators: per block and per linear, the statistics of A = |W|·‖X‖
    (``what="mean"``: their means only, see :func:`block_stats`).

    A block's scores are built on the accelerator and its statistics (exact lower median, mean, outlier
    ratios ``#{A > M·mean(A)}/numel``) taken there, per linear and over the block's linears together
    (without concatenating them); a block's scores take 4 bytes per weight.
    """
    t0 = time.perf_counter()
    per_block: list[dict] = []
    per_linear: dict[str, dict] = {}

    def on_block(i: int, linears: dict, acc: dict) -> None:
        lin_stats, blk = block_stats(linears, acc, ms, what)
        per_linear.update({adapter.full_name(i, n): v for n, v in lin_stats.items()})
        per_block.append(blk)

    split = dense_sweep(model, adapter, calib_ids, device,
                        lambda i, lins: {n: WandaPruner(lin) for n, lin in lins.items()},
                        on_block, batch_size, offload, progress, desc="dense stats", weights=weights)
    return DenseStats(per_block, per_linear, int(calib_ids.shape[0]), time.perf_counter() - t0, split, what)
