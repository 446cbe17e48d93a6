"""Where the mma.sync tile kernel's time goes (``delta_tile_bf16``, the op's kernel for 9–32 tokens): the kernel as
it is, then with parts cut out of its source one after another — the decode (group loads and entry stores), the
products, the x copy — and, for each, with one column split (no split reduction). The cut forms give wrong
outputs by design; only their times are read. Median µs, L2 flushed, dense ``F.linear`` in the same run.

    python3 bench/probe_tile_parts.py --out $OUT/tile_parts.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda  # noqa: E402
from sparse_decode import brief, one_token_cases, timeit, write_rows  # noqa: E402

NO_DECODE = [
    ("    if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);\n"
     "    float acc", "    float acc"),
    ("            if (bb) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], bb, total, sub, q);\n"
     "            store_items(wt, v, w, s, bb, total, sub, q, c0);", "            ;"),
    ("            if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);\n"
     "        }\n        cp_wait();", "        }\n        cp_wait();"),
]
NO_MMA = [("                for (int t = 0; t < MT / 8; ++t) mma16816(acc[m][t], a0, a1, a2, a3, bf[t][0], bf[t][1]);",
           "                for (int t = 0; t < MT / 8; ++t) acc[m][t][0] += __uint_as_float(a0 ^ bf[t][0]);")]
NO_X = [("                cp16(dst, src);", "                ;")]
CUTS = {"full": [], "no_decode": NO_DECODE, "no_decode_mma": NO_DECODE + NO_MMA,
        "no_decode_mma_x": NO_DECODE + NO_MMA + NO_X}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,28672x8192")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    built = {}

    def build(dev, unroll, tokens, name, mt, tile, cut):
        key = (unroll, mt, tuple(tile), cut)
        if key not in built:
            src = delta_cuda.source(unroll, tokens, mt, tile)
            for old, new in CUTS[cut]:
                assert old in src, (cut, old[:70])
                src = src.replace(old, new)
            built[key] = torch.cuda._compile_kernel(src, name, nvcc_options=["--use_fast_math"])
        return built[key]

    real = delta_cuda.kernel
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, "0.7"):
        cidx = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            row = {"shape": [n, k], "sparsity": s, "batch": b, "dense_us": timeit(lambda: F.linear(x, w), a.reps)}
            for cut in CUTS:
                delta_cuda.kernel = (lambda dev, unroll, tokens=1, name="delta_spmv_bf16", mt=16,
                                     tile=delta_cuda.TILE, cut=cut: build(dev, unroll, tokens, name, mt, tile, cut))
                for splits, tag in ((None, ""), (1, "_1split")):
                    fn = (lambda splits=splits: delta_cuda.spmm_tile(x, sp.values, sp.deltas, sp.starts, cidx, n, k,
                                                                     splits=splits))
                    row[f"{cut}{tag}_us"] = timeit(fn, a.reps)
            delta_cuda.kernel = real
            rows.append(row)
            brief(row)
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
