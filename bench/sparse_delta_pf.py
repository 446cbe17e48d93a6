"""The one-token delta kernel with its next step's loads issued early (``prefetch=True``,
``delta_kernels._spmv_pf_kernel``) side by side with the shipped choice (the lane kernel for K < 8192, the
broadcast kernel above) and ``F.linear``. Hypothesis (Nsight Compute, session 12: "L1TEX scoreboard" the main
stall, 25–46% of DRAM bandwidth): each program waits on one step's loads at a time; two steps in flight
should overlap the round trips. Rows: median µs over ``--reps`` calls, L2 flushed.

    python3 bench/sparse_delta_pf.py --out $OUT/pf.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096,1024x4096,28672x8192,8192x28672,8192x8192")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--rs", default="1,2,4")
    ap.add_argument("--gps", default="8,16,32")
    ap.add_argument("--warps", default="1,2")
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    from sparse_decode import brief, one_token_cases, variant_row, write_rows

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows = []
    for n, k, s, w, sp, x in one_token_cases(a.shapes, a.sparsities):
        variants = {"shipped": lambda: delta_kernels.sparse_mm(x, *sp.buffers(), n, k)}
        for r, gp, nw in itertools.product(ints(a.rs), ints(a.gps), ints(a.warps)):
            if r * gp > 64 and nw == 1:
                continue
            variants[f"pf_r{r}_gp{gp}_w{nw}"] = (lambda r=r, gp=gp, nw=nw: delta_kernels.sparse_mm(
                x, *sp.buffers(), n, k, prefetch=True, r=r, gp=gp, num_warps=nw))
        row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=1)
        row["shipped_speedup"] = row["dense_us"] / row["shipped"]
        rows.append(row)
        brief(row, "shape", "sparsity", "dense_us", "shipped", "shipped_speedup", "best", "best_speedup")
        write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
