"""The nm24 kernel's launch settings side by side (session 27: the probe that chose ``nm24_cuda.settings``).

    python3 bench/probe_nm24.py --out $OUT/nm24.json [--batches 1,2,4,8,16,32,64,2048] [--reps 50]

The layout: a 2:4 weight (two nonzeros or fewer in every four columns) is cut into 16 × 32 tiles; a tile is
stored as the 32 lanes' A fragments of ``mma.sp.m16n8k32`` (16 bytes a lane: the tile's 16 × 16 kept values) and
the 16 metadata words that lanes 4g and 4g + 1 hand to the instruction (2-bit positions of the kept values in their
groups of four). 1.125 bytes per weight (0.5625× of dense bf16) against the delta layout's 1.28 (0.64×). The
kernel streams each warp's tiles straight into registers (no decode at all), stages x in shared memory, and reads
its B fragments with ``ldmatrix``; 8 tokens per ``mma``, several tokens' groups and two row strips per warp.

Per shape × batch: dense ``F.linear``, the delta layout through the op, and this kernel, timed as
``bench/sparse_decode.py`` times them; the error of each against dense.
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

from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import delta, nm24, nm24_cuda  # noqa: E402
from layerprune.sparse import linear  # noqa: E402,F401  (registers the ops)


def main() -> None:
    from sparse_decode import DEV, SHAPES, shape_list, timeit, write_rows

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--variants", default="auto,2x4x4,2x8x4,1x8x4,2x4x2",
                    help="strips a warp x warps a block x tiles in flight [x columns of x staged at a time [x blocks a "
                         "SM the registers leave room for]]; auto: nm24_cuda.settings")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    shapes = [(m, tuple(s)) for m, ss in SHAPES.items() for s in ss]
    if a.shapes:  # those of SHAPES named by their model, any other (e.g. q/k/v or gate/up stacked) as "other"
        want = shape_list(a.shapes)
        shapes = [(m, s) for m, s in shapes if s in want] + [("other", s) for s in want
                                                             if all(s != t for _, t in shapes)]
    variants = [None if s == "auto" else tuple(int(v) for v in s.split("x")) for s in a.variants.split(",")]
    label = {v: "auto" if v is None else "x".join(map(str, v)) for v in variants}
    rows = []
    for model, (n, k) in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
        sp24 = nm24.pack(w)
        vals, meta = sp24.values, sp24.meta
        assert torch.equal(nm24.unpack(sp24), w)
        sp = delta.pack(w)
        for b in batches:
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            row = {"model": model, "shape": [n, k], "sparsity": "2:4", "batch": b,
                   "nm24_bytes": sp24.nbytes(), "delta_bytes": sp.nbytes(),
                   "dense_bytes": w.numel() * 2}
            row["dense_us"] = timeit(lambda: F.linear(x, w), a.reps)
            op = torch.ops.layerprune.sparse_linear_delta
            row["delta_us"] = timeit(lambda: op(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k), a.reps)
            for v in variants:
                name = "nm24_" + label[v]
                y = nm24_cuda.spmm(x, vals, meta, n, k, v)
                row[name + "_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                row[name + "_us"] = timeit(lambda v=v: nm24_cuda.spmm(x, vals, meta, n, k, v), a.reps)
            best = min((row["nm24_" + label[v] + "_us"], label[v]) for v in variants)
            row["nm24_best"], row["nm24_speedup"] = best[1], row["dense_us"] / best[0]
            row["delta_speedup"] = row["dense_us"] / row["delta_us"]
            rows.append(row)
            print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in row.items()
                              if not k2.endswith("_bytes")}), flush=True)
        write_rows(a.out, linears=rows)
        del w, vals, meta, sp


if __name__ == "__main__":
    main()
