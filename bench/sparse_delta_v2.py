"""The one-token delta kernels side by side: the lane kernel (``bcast=False``: each group's SWAR words computed on
one lane and moved through shared memory to the lanes of its entries) and the broadcast kernel (``bcast=True``:
each entry lane loads its group's words itself; no layout conversion in the loop), against ``F.linear``.
This run chose ``WIDE_K`` and ``bcast_settings`` in ``layerprune/sparse/delta_kernels.py`` (BENCHMARKS.md,
"Sparse inference", session 12). Rows: median µs over ``--reps`` calls, L2 flushed.

    python3 bench/sparse_delta_v2.py --out $OUT/v2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta, delta_kernels  # noqa: E402


def v2(x: torch.Tensor, sp: delta.DeltaTensor, n: int, k: int, r: int = 2, gp: int = 16, nw: int = 1) -> torch.Tensor:
    """The broadcast kernel with these launch settings (predicated loads below K = 8192, as the op)."""
    return delta_kernels.sparse_mm(x, *sp.buffers(), n, k, r=r, gp=gp, num_warps=nw, bcast=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    import triton
    from sparse_decode import masked, timeit

    rows = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = delta.pack(w)
            x = torch.randn(1, k, device=w.device, dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            row = {"shape": [n, k], "sparsity": s, "batch": 1}
            row["dense_us"] = timeit(lambda: F.linear(x, w), a.reps)
            row["shipped_us"] = timeit(lambda: delta_kernels.sparse_mm(x, *sp.buffers(), n, k, bcast=False), a.reps)
            for r, gp, nw in ((2, 16, 1), (2, 8, 1), (4, 8, 1), (4, 16, 2), (1, 32, 1)):
                fn = lambda r=r, gp=gp, nw=nw: v2(x, sp, n, k, r, gp, nw)  # noqa: E731
                name = f"v2_r{r}_gp{gp}_w{nw}"
                row[name + "_err"] = float((fn().float() - ref).abs().max() / ref.abs().max())
                row[name] = timeit(fn, a.reps)
            best = min((v, kk) for kk, v in row.items() if kk.startswith("v2_") and not kk.endswith("_err"))
            row["best"], row["shipped_speedup"] = best[1], row["dense_us"] / row["shipped_us"]
            row["best_speedup"] = row["dense_us"] / best[0]
            print(f"{n}x{k} s={s}: dense {row['dense_us']:.1f} shipped {row['shipped_us']:.1f} "
                  f"({row['shipped_speedup']:.2f}x) best v2 {best[0]:.1f} {best[1]} ({row['best_speedup']:.2f}x)", flush=True)
            rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
