"""The bitmask tensor-core kernel (``layerprune/sparse/bitmask_cuda.py``: the weight decoded into mma fragments in
registers) against dense ``F.linear`` and the ops as they ship (delta layout: the gather kernel for 1–8 tokens, the
tile kernel for 9–32; bitmask layout: the op, now this kernel, and its Triton kernels, ``bitmask_triton_us``), side
by side in one run. First a correctness pass on
awkward shapes (K not a multiple of 128, N not of 16, empty and full tiles, unequal rows), then per-linear times
(median µs, L2 flushed, ``bench/sparse_decode.py``'s ``timeit``) and, with ``--sweep``, the launch settings.

    python3 bench/sparse_bitmask_mma.py --out $OUT/sparse_bitmask_mma_h200.json [--sweep] [--no-check]

Session 20's runs (bench/results/): ``sparse_bitmask_mma_sweep_h200.json`` (the kernel's first form, with --sweep),
``sparse_bitmask_mma_op_h200.json`` (the ops after it was wired in), ``sparse_bitmask_mma_lean_h200.json`` (the kept
form, with the first form beside it as ``first_form_us``: an ``--ab`` option of this script then, removed with that
form), ``sparse_bitmask_mma_mw_h200.json`` (8–64 tokens, warps × blocks per SM, each also with two row blocks a warp:
``_m2`` keys, a ``--sweep-mw`` option then, removed with that form) and ``sparse_bitmask_mma_final_h200.json`` (the
final code and settings).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import bitmask_cuda, format as bformat, kernels  # noqa: E402
from layerprune.sparse.delta import pack as dpack  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def check(rows: list, spmm=bitmask_cuda.spmm, batches=(1, 3, 8, 9, 16, 33, 64, 65),
          settings=({}, {"splits": 1}, {"warps": 4, "stages": 2}, {"stages": 4, "splits": 3})) -> bool:
    """``spmm`` (a bitmask kernel's entry point) against F.linear in fp32 on awkward weights (K not a multiple of 128,
    N not of 16, empty and full tiles, an empty and a full row) for each batch and settings; appends a row per case."""
    ok = True
    torch.manual_seed(0)
    for n, k, s in [(100, 300, 0.7), (16, 128, 0.0), (33, 129, 0.99), (4096, 4096, 0.7), (1024, 4096, 0.5),
                    (257, 1000, 0.6)]:
        w = masked(n, k, s)
        w[: n // 4, : k // 3] = 0  # empty tiles
        if n > 40:
            w[5] = 0  # an empty row
            w[7] = torch.randn(k, device=DEV, dtype=w.dtype)  # a full row
        sp = bformat.pack(w)
        for b in batches:
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            for kw in settings:
                y = spmm(x, sp.bitmask, sp.values, sp.offsets, n, k, **kw)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)) if y is not None else -1.0
                good = y is not None and err < 1e-2
                ok &= good
                if not good:
                    print("FAIL", n, k, s, b, kw, err, flush=True)
                rows.append({"shape": [n, k], "sparsity": s, "batch": b, "settings": kw, "rel_err": err, "ok": good})
    print("correct:", ok, flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096,4096x11008,14336x4096,8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="also time warps × stages × blocks per SM")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    checks: list = []
    if not a.no_check:
        check(checks)
        write_rows(a.out, checks=checks)
    rows = []
    sweep = list(itertools.product((4, 8), (2, 3, 4), (1.0, 2.0, 4.0))) if a.sweep else []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sb, sd = bformat.pack(w), dpack(w)
            for b in (int(v) for v in a.batches.split(",")):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                row = {"shape": [n, k], "sparsity": s, "batch": b,
                       "dense_us": timeit(lambda: F.linear(x, w), a.reps),
                       "delta_op_us": timeit(lambda: op(x, sd, n, k), a.reps),
                       "bitmask_op_us": timeit(lambda: op(x, sb, n, k), a.reps),
                       "bitmask_triton_us": timeit(lambda: kernels.sparse_mm(x, sb.bitmask, sb.values, sb.offsets, n, k,
                                                                             sb.bn, sb.bk), a.reps),
                       "mma_us": timeit(lambda: bitmask_cuda.spmm(x, sb.bitmask, sb.values, sb.offsets, n, k), a.reps)}
                for wb, nst, bps in sweep:
                    fn = (lambda wb=wb, nst=nst, bps=bps: bitmask_cuda.spmm(
                        x, sb.bitmask, sb.values, sb.offsets, n, k, warps=wb, stages=nst, blocks_per_sm=bps))
                    if fn() is not None:
                        row[f"mma_w{wb}_s{nst}_b{bps:g}_us"] = timeit(fn, a.reps)
                tried = {key: v for key, v in row.items() if key.startswith("mma") and key.endswith("_us")}
                best = min(tried, key=tried.get)
                row.update(best=best, best_us=tried[best], speedup_default=row["dense_us"] / row["mma_us"],
                           speedup_best=row["dense_us"] / tried[best],
                           speedup_shipped=row["dense_us"] / min(row["delta_op_us"], row["bitmask_op_us"]))
                rows.append(row)
                brief(row, "shape", "sparsity", "batch", "dense_us", "delta_op_us", "mma_us", "best", "speedup_default",
                      "speedup_best", "speedup_shipped")
                write_rows(a.out, checks=checks, linears=rows)


if __name__ == "__main__":
    main()
