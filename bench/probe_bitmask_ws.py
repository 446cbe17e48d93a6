"""The warp-specialised bitmask kernel (``layerprune/sparse/bitmask_ws.py``: producer warps decode into shared
memory, consumer warpgroups run ``wgmma`` with both operands from shared memory) against dense ``F.linear``, the
A-from-registers ``wgmma`` kernel (``bitmask_wgmma``) and the ops as they ship, side by side in one run: a correctness
pass (``sparse_bitmask_mma.check``'s awkward weights), then median µs with the L2 flushed; ``--parts`` also times the
kernel with its decode cut (1), its products cut (2) and both (3).

    python3 bench/probe_bitmask_ws.py --out $OUT/ws.json [--no-check] [--parts]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import bitmask_wgmma, bitmask_ws, format as bformat  # noqa: E402
from layerprune.sparse.delta import pack as dpack  # noqa: E402
from sparse_bitmask_mma import check as mma_check  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def check(rows: list) -> bool:
    return mma_check(rows, bitmask_ws.spmm, batches=(1, 3, 16, 33, 64, 65, 200),
                     settings=({}, {"splits": 1}, {"stages": 3, "splits": 3, "pw": 2, "cw": True}, {"pw": 2},
                               {"cw": True, "splits": 2}, {"mt": 128, "stages": 3, "cw": True}))


def variants(b: int) -> list[dict]:
    if b <= 64:
        return [{"stages": st, "blocks_per_sm": bps, "pw": pw, "cw": cw} for st in (3, 4) for bps in (1.0, 2.0)
                for pw in (1, 2) for cw in (False, True)]
    return [{"mt": 128, "stages": 3}, {"mt": 128, "stages": 3, "cw": True}, {"mt": 64, "pw": 2, "cw": True}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096,4096x11008,14336x4096,8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--parts", action="store_true")
    a = ap.parse_args()
    checks: list = []
    if not a.no_check:
        ok = check(checks)
        write_rows(a.out, checks=checks)
        if not ok:
            print("the kernel is wrong: no timings", flush=True)
            return
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sb, sd = bformat.pack(w), dpack(w)
            for b in (int(v) for v in a.batches.split(",")):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                reps = a.reps if b <= 256 else max(10, a.reps // 3)
                args = (x, sb.bitmask, sb.values, sb.offsets, n, k)
                row = {"shape": [n, k], "sparsity": s, "batch": b,
                       "dense_us": timeit(lambda: F.linear(x, w), reps),
                       "delta_op_us": timeit(lambda: op(x, sd, n, k), reps),
                       "bitmask_op_us": timeit(lambda: op(x, sb, n, k), reps),
                       "wg_us": timeit(lambda: bitmask_wgmma.spmm(*args), reps),
                       "ws_us": timeit(lambda: bitmask_ws.spmm(*args), reps)}
                for v in (variants(b) if a.sweep else []):
                    if bitmask_ws.spmm(*args, **v) is not None:
                        key = "ws_" + "_".join(f"{kk}{float(vv):g}" for kk, vv in v.items()) + "_us"
                        row[key] = timeit(lambda v=v: bitmask_ws.spmm(*args, **v), reps)
                if a.parts and b <= 64:
                    for p in (1, 2, 3):
                        row[f"ws_probe{p}_us"] = timeit(lambda p=p: bitmask_ws.spmm(*args, probe=p), reps)
                        row[f"ws_pw2_cw_probe{p}_us"] = timeit(
                            lambda p=p: bitmask_ws.spmm(*args, probe=p, pw=2, cw=True), reps)
                tried = {kk: v for kk, v in row.items() if kk.startswith("ws") and "probe" not in kk}
                best = min(tried, key=tried.get)
                shipped = min(row["delta_op_us"], row["bitmask_op_us"])
                row.update(best=best, best_us=tried[best], speedup_ws=row["dense_us"] / row["ws_us"],
                           speedup_best=row["dense_us"] / tried[best], speedup_shipped=row["dense_us"] / shipped)
                rows.append(row)
                brief(row, "shape", "batch", "dense_us", "bitmask_op_us", "wg_us", "ws_us", "best", "best_us",
                      "speedup_ws", "speedup_best", "speedup_shipped", "ws_probe1_us", "ws_probe2_us", "ws_probe3_us",
                      "ws_pw2_cw_probe1_us", "ws_pw2_cw_probe3_us")
                write_rows(a.out, checks=checks, linears=rows)


if __name__ == "__main__":
    main()
