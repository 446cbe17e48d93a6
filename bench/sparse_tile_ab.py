"""The tensor-core tile kernel of this tree side by side with another version of ``delta_cuda.py`` (a file, e.g.
from another commit), through ``spmm_tile`` with each one's defaults: 70%, 16/32/64 tokens, median µs with L2
flushed, dense ``F.linear`` in the same run.

    git show 4b37b17:layerprune/sparse/delta_cuda.py > .stage/other_delta_cuda.py
    python3 bench/sparse_tile_ab.py --other .stage/other_delta_cuda.py --out $OUT/ab.json

Session 16: 4b37b17 (32-bit fragment loads) against ldmatrix, ``sparse_delta_tile_ldsm_h200.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda  # noqa: E402
from sparse_decode import brief, one_token_cases, timeit, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="another version of layerprune/sparse/delta_cuda.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096,14336x4096,4096x14336,"
                                        "8192x8192,28672x8192,8192x28672")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("other_delta_cuda", a.other)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, "0.7"):
        cidx = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            ref = F.linear(x, w).float()
            fns = {"dense": lambda: F.linear(x, w),
                   "this": lambda: delta_cuda.spmm_tile(x, sp.values, sp.deltas, sp.starts, cidx, n, k),
                   "other": lambda: other.spmm_tile(x, sp.values, sp.deltas, sp.starts, cidx, n, k)}
            row = {"shape": [n, k], "sparsity": s, "batch": b}
            for name, fn in fns.items():
                row[name + "_err"] = float((fn().float() - ref).abs().max() / ref.abs().max())
                row[name + "_us"] = timeit(fn, a.reps)
            row["this_over_other"] = row["other_us"] / row["this_us"]
            rows.append(row)
            brief(row)
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
