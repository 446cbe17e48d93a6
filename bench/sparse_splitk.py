"""Split-K for the bitmask layout's tile kernel (3–64 tokens), side by side with F.linear on the GPU.

    python3 bench/sparse_splitk.py --out $OUT/sparse_splitk.json

Hypothesis under test (BENCHMARKS.md, "Sparse inference"): the tile kernel takes the same time at 4, 16 and 64
tokens (speed-ups 0.34 / 0.34 / 0.33 on 4096×4096 at 70%), so it is bound by the 32 dependent tile decodes each of its 256
programs walks, not by the tensor cores. ``split_k`` s gives each row block s programs over every s-th tile
(fp32 atomic adds). Rows: median µs over ``--reps`` calls, L2 flushed, for split 1 (the kernel as shipped)
and each split, with the max relative error against F.linear.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import kernels  # noqa: E402
from layerprune.sparse.format import pack  # noqa: E402
from sparse_decode import brief, masked, shape_list, variant_row, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--batches", default="4,16,64")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = pack(w)
            for b in (int(v) for v in a.batches.split(",")):
                x = torch.randn(b, k, device=w.device, dtype=torch.bfloat16)
                variants = {f"split{split}_w{nw}": (lambda split=split, nw=nw: kernels.sparse_mm(
                    x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, num_warps=nw, split_k=split))
                    for split in (int(v) for v in a.splits.split(",")) for nw in (int(v) for v in a.warps.split(","))}
                row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=b)
                row["shipped_speedup"] = row["dense_us"] / row["split1_w4"] if "split1_w4" in row else None
                rows.append(row)
                brief(row)
    write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
