"""The compact form of the ``delta`` layout against the plain form, side by side on the GPU (session 27).

    python3 bench/probe_compact.py --out $OUT/compact.json [--batches 1,2,4,8,16,32,64,2048] [--reps 50]

Per shape (LLaMA-2-7B, Llama-3-8B, LLaMA-2-70B linears) × sparsity × batch: dense ``F.linear``, the op on the plain
form (``delta.pack``) and the op on its compact form (``delta.compact``) of the same weight, timed as
``bench/sparse_decode.py`` times (CUDA events, L2 flushed, median). The outputs of the two forms must be equal bit
for bit (same values, same order of the sums); each row says so, with the error against dense.

The masks are Wanda-like, as layerprune's pruning makes them: per row, the weights of the smallest |w|·‖x_j‖
with random column norms ‖x_j‖ (a cube of a uniform draw, 0.1–50) are zeroed; ``--mask random`` zeroes at random
instead (then small values are kept and some groups may not fit: ``compact_fits`` says whether the weight did).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_decode import DEV, SHAPES, timeit, write_rows  # noqa: E402

from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import delta  # noqa: E402
from layerprune.sparse import linear  # noqa: E402,F401  (registers the ops)


def wanda_like(n: int, k: int, sparsity, mask: str) -> torch.Tensor:
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    if mask == "random" and sparsity != "2:4":
        return w.masked_fill(torch.rand(n, k, device=DEV) < sparsity, 0)
    score = w.float().abs() * (torch.rand(k, device=DEV).pow(3) * 50 + 0.1)
    if sparsity == "2:4":
        return w.masked_fill(nm_mask(score, 2, 4), 0)
    drop = int(round(sparsity * k))
    idx = score.topk(drop, dim=1, largest=False).indices
    return w.scatter(1, idx, torch.zeros_like(w[:, :drop]))


def op(x, sp, n, k):
    return torch.ops.layerprune.sparse_linear_delta(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,2048")
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--mask", default="wanda", choices=["wanda", "random"])
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    sparsities = [s if s == "2:4" else float(s) for s in a.sparsities.split(",")]
    shapes = [(m, tuple(s)) for m, ss in SHAPES.items() for s in ss]
    if a.shapes:
        want = {tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")}
        shapes = [(m, s) for m, s in shapes if s in want]
    rows = []
    for model, (n, k) in shapes:
        for s in sparsities:
            torch.manual_seed(0)
            w = wanda_like(n, k, s, a.mask)
            plain = delta.pack(w)
            cpt = delta.compact(plain)
            base = {"model": model, "shape": [n, k], "sparsity": s, "mask": a.mask, "plain_bytes": plain.nbytes(),
                    "dense_bytes": w.numel() * 2, "compact_fits": cpt is not None}
            if cpt is None:
                rows.append(base)
                print(json.dumps(base), flush=True)
                continue
            base["compact_bytes"] = cpt.nbytes()
            for b in batches:
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                ref = F.linear(x, w).float()
                yp, yc = op(x, plain, n, k), op(x, cpt, n, k)
                row = dict(base, batch=b, same=bool(torch.equal(yp, yc)),
                           compact_err=float((yc.float() - ref).abs().max() / ref.abs().max()))
                row["dense_us"] = timeit(lambda: F.linear(x, w), a.reps)
                row["plain_us"] = timeit(lambda: op(x, plain, n, k), a.reps)
                row["compact_us"] = timeit(lambda: op(x, cpt, n, k), a.reps)
                row["plain_speedup"] = row["dense_us"] / row["plain_us"]
                row["compact_speedup"] = row["dense_us"] / row["compact_us"]
                rows.append(row)
                print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()
                                  if k2 not in ("model", "mask", "plain_bytes", "dense_bytes", "compact_bytes")}),
                      flush=True)
            del w, plain, cpt
            write_rows(a.out, linears=rows)
    write_rows(a.out, linears=rows)


if __name__ == "__main__":
    main()
