"""N:M weights at 2–8 tokens where the one-token kernel's pass would run without its skewed x (K ≥ 14336): the op
(which sends a regular weight's call to the tile kernel, ``delta_cuda.regular``) against the gather kernel it ran
before (``delta_cuda.spmv``), the tile kernel (``delta_kernels.tensor_cores``) and dense ``F.linear``, side by side in
one run, median µs with the L2 flushed; random masks as the control (the op keeps the gather kernel for them).

    python3 bench/probe_regular.py --out $OUT/regular.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda, delta_kernels  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8192x28672,4096x14336,4096x11008")
    ap.add_argument("--sparsities", default="2:4,0.7,0.5")
    ap.add_argument("--batches", default="2,3,4,8")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (v if v == "2:4" else float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = pack(w)
            reg = delta_cuda.regular(sp.starts, sp.gptr)
            for b in (int(v) for v in a.batches.split(",")):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                ref = F.linear(x.float(), w.float())
                err = float((op(x, sp, n, k).float() - ref).abs().max() / ref.abs().max())
                row = {"shape": [n, k], "sparsity": s, "batch": b, "regular": reg,
                       "unskewed": delta_cuda.unskewed(b, k, delta_cuda._props(0)[1]), "rel_err": err,
                       "dense_us": timeit(lambda: F.linear(x, w), a.reps),
                       "op_us": timeit(lambda: op(x, sp, n, k), a.reps),
                       "gather_us": timeit(lambda: delta_cuda.spmv(x, *sp.buffers(), n, k), a.reps),
                       "tile_us": timeit(lambda: delta_kernels.tensor_cores(x, *sp.buffers(), n, k), a.reps)}
                for key in ("op", "gather", "tile"):
                    row[f"speedup_{key}"] = row["dense_us"] / row[f"{key}_us"]
                rows.append(row)
                brief(row, "shape", "sparsity", "batch", "regular", "unskewed", "rel_err", "dense_us", "op_us",
                      "gather_us", "tile_us", "speedup_op", "speedup_gather", "speedup_tile")
                write_rows(a.out, linears=rows)


if __name__ == "__main__":
    main()
