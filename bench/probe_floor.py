"""The floor under a one-token product on small weights: in the per-linear harness (CUDA events, L2 flushed, median),
the time of an almost empty kernel (4 bytes zeroed), of a device copy of as many bytes as the packed weight (delta
layout: values + deltas + starts + row pointers; it reads them from DRAM and writes them to L2), of the shipped
one-token kernel and of dense ``F.linear``. What the one-token goal (≥ 1.8× dense) leaves for the kernel is then
dense / 1.8 minus the empty kernel.

    python3 bench/probe_floor.py --out $OUT/floor.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparse_decode import brief, masked, op, shape_list, timeit, write_rows  # noqa: E402

from layerprune.sparse.delta import pack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1024x4096,4096x4096,11008x4096,8192x8192")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    rows = []
    tiny = torch.zeros(1, dtype=torch.int32, device="cuda")
    for n, k in shape_list(a.shapes):
        w = masked(n, k, a.sparsity)
        sp = pack(w)
        nbytes = sp.nbytes()
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"shape": [n, k], "sparsity": a.sparsity, "packed_bytes": nbytes,
               "empty_kernel_us": timeit(lambda: tiny.zero_(), a.reps),
               "copy_packed_bytes_us": timeit(lambda: dst.copy_(src), a.reps),
               "delta_op_us": timeit(lambda: op(x, sp, n, k), a.reps),
               "dense_us": timeit(lambda: F.linear(x, w), a.reps)}
        row["goal_us"] = row["dense_us"] / 1.8
        row["speedup"] = row["dense_us"] / row["delta_op_us"]
        row["speedup_if_copy_time"] = row["dense_us"] / row["copy_packed_bytes_us"]
        rows.append(row)
        brief(row)
        write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
