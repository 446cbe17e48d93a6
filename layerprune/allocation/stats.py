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


def lower_median(x: torch.Tensor) -> float:
    """The lower median (``torch.median`` convention): the ⌈n/2⌉-th smallest value, exact, computed where
    ``x`` lives: one sort on the accelerator (``kthvalue`` on a CUDA tensor of 10⁸ elements is ~10× slower),
    ``kthvalue`` on the CPU."""
    k = (x.numel() + 1) // 2
    if x.is_cuda:
        return float(torch.sort(x.flatten()).values[k - 1])
    return float(torch.kthvalue(x.flatten(), k).values)


def score_stats(scores: torch.Tensor, ms: tuple[float, ...]) -> dict:
    mean = float(scores.sum(dtype=torch.float64) / scores.numel())
    return {"median": lower_median(scores), "mean": mean,
            "outlier": {m: float((scores > m * mean).sum()) / scores.numel() for m in ms}}


def dense_stats_pass(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor, device: torch.device,
                     batch_size: int = 8, offload: str = "auto", ms: tuple[float, ...] = OUTLIER_MS,
                     progress: bool = True, weights: object = None) -> DenseStats:
    """The dense sweep with Wanda accumulators: per block and per linear, the statistics of A = |W|·‖X‖.

    A block's scores are built on the accelerator and its statistics (exact lower median, mean, outlier
    ratios ``#{A > M·mean(A)}/numel``) taken there; a block's concatenated scores take 4 bytes per weight.
    """
    t0 = time.perf_counter()
    per_block: list[dict] = []
    per_linear: dict[str, dict] = {}

    def on_block(i: int, linears: dict, acc: dict) -> None:
        parts = []
        for n, a in acc.items():
            sc = a.score()
            per_linear[adapter.full_name(i, n)] = score_stats(sc, ms)
            parts.append(sc.flatten())
            a.free()
        per_block.append(score_stats(torch.cat(parts), ms))

    dense_sweep(model, adapter, calib_ids, device, lambda i, lins: {n: WandaPruner(lin) for n, lin in lins.items()},
                on_block, batch_size, offload, progress, desc="dense stats", weights=weights)
    return DenseStats(per_block, per_linear, int(calib_ids.shape[0]), time.perf_counter() - t0)
