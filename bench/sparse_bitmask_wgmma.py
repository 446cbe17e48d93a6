"""The bitmask wgmma kernel (``layerprune/sparse/bitmask_wgmma.py``: the weight decoded into the A registers of
Hopper's ``wgmma``, x read by the tensor cores from shared memory) against dense ``F.linear``, the mma.sync kernel
(``bitmask_cuda``, up to 64 tokens) and the ops as they ship (bitmask op; delta op: unpack + cuBLAS past 32 tokens),
side by side in one run: a correctness pass, then median µs with the L2 flushed (``bench/sparse_decode.py``'s
``timeit``); ``--sweep`` also times the kernel's settings (tokens a block, warpgroups, stages, register sets,
blocks per SM).

    python3 bench/sparse_bitmask_wgmma.py --out $OUT/sparse_bitmask_wgmma_h200.json [--sweep] [--no-check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import bitmask_cuda, bitmask_wgmma, format as bformat  # noqa: E402
from layerprune.sparse.delta import pack as dpack  # noqa: E402
from sparse_bitmask_mma import check as mma_check  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def check(rows: list) -> bool:
    return mma_check(rows, bitmask_wgmma.spmm, batches=(1, 3, 8, 16, 33, 64, 65, 200, 2048),
                     settings=({}, {"splits": 1}, {"two": False, "stages": 3}, {"mt": 128, "nwg": 2, "stages": 3}))


def variants(b: int) -> list[dict]:
    """Settings swept at ``b`` tokens."""
    if b <= 64:
        out = [{"nwg": nwg, "stages": nst, "two": two, "swz": True, "blocks_per_sm": bps}
               for nwg, bps in ((2, 2.0), (4, 1.0)) for nst in (3, 4) for two in (True, False)]
        return out + [{"nwg": 4, "stages": 4, "two": False, "swz": False, "blocks_per_sm": 1.0},
                      {"nwg": 3, "stages": 4, "two": False, "swz": True, "blocks_per_sm": 1.0}]
    return [{"mt": 128, "nwg": 2, "stages": 3, "two": True, "swz": True},
            {"mt": 256, "nwg": 2, "stages": 2, "two": False, "swz": True}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096,4096x11008,14336x4096,8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--batches", default="8,16,32,64,2048")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    checks: list = []
    if not a.no_check:
        check(checks)
        write_rows(a.out, checks=checks)
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sb, sd = bformat.pack(w), dpack(w)
            for b in (int(v) for v in a.batches.split(",")):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                reps = a.reps if b <= 256 else max(10, a.reps // 3)
                row = {"shape": [n, k], "sparsity": s, "batch": b,
                       "dense_us": timeit(lambda: F.linear(x, w), reps),
                       "delta_op_us": timeit(lambda: op(x, sd, n, k), reps),
                       "bitmask_op_us": timeit(lambda: op(x, sb, n, k), reps),
                       "wg_us": timeit(lambda: bitmask_wgmma.spmm(x, sb.bitmask, sb.values, sb.offsets, n, k), reps)}
                if b <= 64:
                    row["mma_us"] = timeit(lambda: bitmask_cuda.spmm(x, sb.bitmask, sb.values, sb.offsets, n, k), reps)
                for v in (variants(b) if a.sweep else []):
                    fn = (lambda v=v: bitmask_wgmma.spmm(x, sb.bitmask, sb.values, sb.offsets, n, k, **v))
                    if fn() is not None:
                        key = "wg_" + "_".join(f"{kk}{vv:g}" if isinstance(vv, float) else f"{kk}{int(vv)}"
                                               for kk, vv in v.items()) + "_us"
                        row[key] = timeit(fn, reps)
                tried = {key: v for key, v in row.items() if key.startswith("wg") and key.endswith("_us")}
                best = min(tried, key=tried.get)
                shipped = min(row["delta_op_us"], row["bitmask_op_us"])
                row.update(best=best, best_us=tried[best], speedup_wg=row["dense_us"] / row["wg_us"],
                           speedup_best=row["dense_us"] / tried[best], speedup_shipped=row["dense_us"] / shipped)
                rows.append(row)
                brief(row, "shape", "batch", "dense_us", "delta_op_us", "bitmask_op_us", "mma_us", "wg_us", "best",
                      "best_us", "speedup_wg", "speedup_best", "speedup_shipped")
                write_rows(a.out, checks=checks, linears=rows)


if __name__ == "__main__":
    main()
