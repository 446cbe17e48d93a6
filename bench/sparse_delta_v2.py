"""The one-token delta kernels side by side: the lane kernel (``bcast=False``: each group's SWAR words computed on
one lane and moved through shared memory to the lanes of its entries) and the broadcast kernel (``bcast=True``:
each entry lane loads its group's words itself; no layout conversion in the loop), against ``F.linear``.
This run chose ``WIDE_K`` and ``bcast_settings`` in ``layerprune/sparse/delta_kernels.py`` (BENCHMARKS.md,
"Sparse inference", session 12). Rows: median µs over ``--reps`` calls, L2 flushed.

    python3 bench/sparse_delta_v2.py --out $OUT/v2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    from sparse_decode import one_token_cases, timeit, variant_row, write_rows

    rows = []
    for n, k, s, w, sp, x in one_token_cases(a.shapes, a.sparsities):
        variants = {f"v2_r{r}_gp{gp}_w{nw}": (lambda r=r, gp=gp, nw=nw: delta_kernels.sparse_mm(
            x, *sp.buffers(), n, k, r=r, gp=gp, num_warps=nw, bcast=True))
            for r, gp, nw in ((2, 16, 1), (2, 8, 1), (4, 8, 1), (4, 16, 2), (1, 32, 1))}
        row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=1)
        row["shipped_us"] = timeit(lambda: delta_kernels.sparse_mm(x, *sp.buffers(), n, k, bcast=False), a.reps)
        row["shipped_speedup"] = row["dense_us"] / row["shipped_us"]
        print(f"{n}x{k} s={s}: dense {row['dense_us']:.1f} shipped {row['shipped_us']:.1f} "
              f"({row['shipped_speedup']:.2f}x) best v2 {row[row['best']]:.1f} {row['best']} "
              f"({row['best_speedup']:.2f}x)", flush=True)
        rows.append(row)
    if a.out:
        write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
