"""The Hopper wgmma tile kernel (``delta_wgmma.spmm_wg``) side by side with the mma.sync tile kernel
(``delta_cuda.spmm_tile``), unpack + cuBLAS and dense ``F.linear``: median µs with L2 flushed, one run.

    python3 bench/sparse_wgmma.py --out $OUT/wg.json                       # 70%, 16/32/64 tokens, 9 shapes
    python3 bench/sparse_wgmma.py --variants 128:3:1:2,256:2:2:1 --out ...

Each variant ``KC:PER_SM:NWG:STAGES[:U]`` is the wgmma kernel with chunks of KC columns, about PER_SM blocks per SM
(the column splits follow), NWG warpgroups a block and 1 or 2 stages. Session 19, raw ``bench/results/sparse_wgmma_h200.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda, delta_kernels, delta_wgmma  # noqa: E402
from sparse_decode import brief, one_token_cases, timeit, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096,14336x4096,4096x14336,"
                                        "8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--variants", default="128:4:1:2,256:2:2:1,256:3:2:1,256:4:1:1,128:3:2:1,128:2:2:2",
                    help="KC:PER_SM:NWG:STAGES[:U],... of the wgmma kernel (U: steps in flight, default 4)")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = [tuple(int(v) for v in s.split(":")) + (4,) * (5 - len(s.split(":"))) for s in a.variants.split(",")]
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, a.sparsities):
        cidx = {kc: delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k, kc) for kc in {v[0] for v in variants}}
        c256 = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            ref = F.linear(x.float(), w.float())
            fns = {"dense": lambda: F.linear(x, w),
                   "mma": lambda: delta_cuda.spmm_tile(x, sp.values, sp.deltas, sp.starts, c256, n, k),
                   "unpack": lambda: F.linear(x, delta_kernels.decompress(*sp.buffers(), n, k))}
            for kc, per, nwg, st, u in variants:
                nch = -(-k // kc)
                fns[f"wg_{kc}_{per}_{nwg}_{st}_{u}"] = (lambda kc=kc, per=per, nwg=nwg, st=st, u=u, nch=nch: delta_wgmma.spmm_wg(
                    x, sp.values, sp.deltas, sp.starts, cidx[kc], n, k, kc=kc, nwg=nwg, stages=st, unroll=u,
                    splits=delta_wgmma.splits_for(n, nch, sms, per, 64 * nwg)))
            row = {"shape": [n, k], "sparsity": s, "batch": b}
            for name, fn in fns.items():
                row[name + "_err"] = float((fn().float() - ref).abs().max() / ref.abs().max())
                row[name + "_us"] = timeit(fn, a.reps)
            best = min((v for v in row if v.startswith("wg_") and v.endswith("_us")), key=row.get)
            row["best_wg"] = best[:-3]
            row["best_wg_speedup"] = row["dense_us"] / row[best]
            row["mma_speedup"] = row["dense_us"] / row["mma_us"]
            row["unpack_speedup"] = row["dense_us"] / row["unpack_us"]
            rows.append(row)
            brief(row)
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
