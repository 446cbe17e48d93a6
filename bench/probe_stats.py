"""Op-by-op times of the DLP/OWL statistics on one LLaMA-2-7B-sized block (random bf16 weights, Σx² of
random bf16 activations), on the GPU: the Wanda hook per calibration batch (8 × 2048 tokens), the block's
statistics now (``allocation.stats.block_stats``: radix select, histograms shared between a linear and its
block) against the previous version (bincount of the top 16 bits per linear and again per block, a sort
of the chosen bucket, every outlier count synchronised), and the pieces of both.

    python3 bench/probe_stats.py --out $OUT/probe_stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.allocation.stats import OUTLIER_MS, block_stats, digit_hist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_forward import timed as cuda_timed  # noqa: E402
from layerprune.pruners.wanda import WandaPruner  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def timed(fn, reps: int = 5) -> float:
    """Median seconds of ``fn`` over ``reps`` calls (CUDA events, ``probe_forward.timed``) after one warm-up."""
    fn()
    torch.cuda.synchronize()
    return cuda_timed(fn, reps)


# ---- the previous version (commit fe1d405), kept here only to time it side by side
def _prev_bucket(t):
    return (t.view(torch.int32) & 0x7FFFFFFF) >> 16


def _prev_kth(parts, k):
    hist = None
    for t in parts:
        h = torch.bincount(_prev_bucket(t), minlength=1 << 15)
        hist = h if hist is None else hist + h
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device, dtype=cum.dtype)))
    below = int(cum[b - 1]) if b > 0 else 0
    cand = torch.cat([t[_prev_bucket(t) == b] for t in parts])
    return float(torch.sort(cand).values[k - below - 1])


def _prev_stats(parts, ms):
    parts = [t.flatten() for t in parts]
    n = sum(t.numel() for t in parts)
    mean = float(sum(t.sum(dtype=torch.float64) for t in parts) / n)
    k = (n + 1) // 2
    ok = all(bool((t >= 0).all()) for t in parts)
    med = _prev_kth(parts, k) if ok else None
    return {"median": med, "mean": mean, "outlier": {m: float(sum((t > m * mean).sum() for t in parts)) / n for m in ms}}


def _prev_block(linears, acc, ms):
    out, parts = {}, []
    for n, a in acc.items():
        sc = a.score()
        out[n] = _prev_stats([sc], ms)
        parts.append(sc)
    return out, _prev_stats(parts, ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    linears = {}
    for n, (o, i) in SHAPES.items():
        lin = torch.nn.Linear(i, o, bias=False, device=dev, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        linears[n] = lin
    xs = {k: torch.randn(a.tokens, k, device=dev, dtype=torch.bfloat16) for k in (4096, 11008)}
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens_per_batch": a.tokens}

    # the Wanda hook, per batch and per distinct input width
    for k, x in xs.items():
        sq = torch.zeros(k, device=dev)

        def old():
            xf = x.float()
            sq.add_((xf * xf).sum(dim=0))

        def new():
            sq.add_(torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_())

        res[f"hook_{k}"] = {"float_copy_then_square_sum_s": timed(old), "vector_norm_fp32_s": timed(new)}

    def accs():
        out = {}
        for n, lin in linears.items():
            w = WandaPruner(lin)
            w.add_batch(xs[lin.in_features])
            out[n] = w
        return out

    res["block_stats_now_s"] = timed(lambda: block_stats(linears, accs(), OUTLIER_MS))
    res["block_stats_previous_s"] = timed(lambda: _prev_block(linears, accs(), OUTLIER_MS))
    res["accumulators_only_s"] = timed(accs)
    now = block_stats(linears, accs(), OUTLIER_MS)
    prev = _prev_block(linears, accs(), OUTLIER_MS)
    res["same_block_median"] = now[1]["median"] == prev[1]["median"]
    res["same_linear_medians"] = all(now[0][n]["median"] == prev[0][n]["median"] for n in linears)

    # pieces over the block's 200 M scores
    acc = accs()
    scores = [acc[n].score().reshape(-1) for n in linears]
    res["numel"] = sum(t.numel() for t in scores)
    res["pieces_s"] = {
        "scores": timed(lambda: [acc[n].score() for n in linears]),
        "bincount_top15": timed(lambda: digit_hist(scores, 16, 15, dev)),
        "bincount_top12_shared_mem": timed(lambda: digit_hist(scores, 19, 12, dev)),
        "sum_fp64": timed(lambda: [t.sum(dtype=torch.float64) for t in scores]),
        "compare_count_x7": timed(lambda: [torch.stack([(t > 0.01 * j).sum() for j in range(7)]) for t in scores]),
        "min_max_item": timed(lambda: [(int(t.view(torch.int32).min()), int(t.view(torch.int32).max())) for t in scores]),
    }
    h = digit_hist(scores, 16, 15, dev)
    cum = h.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([(res["numel"] + 1) // 2], device=dev)))
    cand = [t[((t.view(torch.int32) >> 16) & 0x7FFF) == b] for t in scores]
    res["median_bucket_size"] = sum(c.numel() for c in cand)
    res["pieces_s"]["compact_to_bucket"] = timed(lambda: [t[((t.view(torch.int32) >> 16) & 0x7FFF) == b] for t in scores])
    res["pieces_s"]["bincount_low16_of_bucket"] = timed(lambda: digit_hist(cand, 0, 16, dev))
    res["pieces_s"]["sort_bucket"] = timed(lambda: torch.sort(torch.cat(cand)))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
