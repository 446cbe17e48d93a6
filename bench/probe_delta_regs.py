"""Does the one-token delta kernel gain from more warps per SM? It uses 56 registers, so at most 32 warps fit on an
SM (4 blocks of 8). Compiled with ``--maxrregcount`` 48 (16 bytes spilled) or 40 (68 bytes), 40 or 48 warps fit.
Side by side in one run with the shipped op and dense ``F.linear``: median µs, L2 flushed.

    python3 bench/probe_delta_regs.py --out $OUT/regs.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402
from sparse_decode import brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672,4096x4096,11008x4096,4096x11008")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    sms, limit = delta_cuda._props(0)
    kerns = {}
    for reg, u in itertools.product((0, 48, 40), (1, 2)):
        opts = ["--use_fast_math"] + ([f"--maxrregcount={reg}"] if reg else [])
        kerns[(reg, u)] = torch.cuda._compile_kernel(delta_cuda.source(u, 1), "delta_spmv_bf16", nvcc_options=opts)
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = pack(w)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x.float(), w.float())
            row = {"shape": [n, k], "sparsity": s, "batch": 1, "dense_us": timeit(lambda: F.linear(x, w), a.reps),
                   "delta_op_us": timeit(lambda: op(x, sp, n, k), a.reps)}
            skw = delta_cuda.skew(1) if delta_cuda.smem_bytes(k, 1) <= limit else 0
            smem = delta_cuda.smem_bytes(k, 1, skw)
            for (reg, u), kern in kerns.items():
                for warps, per_sm in ((8, 4), (8, 5), (8, 6), (4, 10), (4, 12), (16, 0), (16, 3)):
                    grid = min(sms * per_sm, -(-n // warps)) if per_sm else -(-n // warps)

                    def fn(kern=kern, grid=grid, warps=warps):
                        delta_cuda._launch(kern, (grid, 1), 32 * warps, smem, stream,
                                           (x, sp.values, sp.deltas, sp.starts, sp.gptr, y), (n, k, 1, k, 1, skw))
                        return y
                    fn()
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    key = f"r{reg}_u{u}_w{warps}_b{per_sm}"
                    row[key + "_us"] = timeit(fn, a.reps)
                    row[key + "_err"] = err
            tried = {key: v for key, v in row.items() if key.startswith("r") and key.endswith("_us")}
            best = min(tried, key=tried.get)
            row.update(best=best, best_us=tried[best], speedup_op=row["dense_us"] / row["delta_op_us"],
                       speedup_best=row["dense_us"] / tried[best],
                       max_err=max(v for key, v in row.items() if key.endswith("_err")))
            rows.append(row)
            brief(row, "shape", "dense_us", "delta_op_us", "best", "best_us", "speedup_op", "speedup_best", "max_err")
            write_rows(a.out, linears=rows)


if __name__ == "__main__":
    main()
