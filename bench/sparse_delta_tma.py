"""The one-token delta kernel fed by Hopper bulk copies (``delta_cuda.spmv_tma``: each warp's row chunks brought by
``cp.async.bulk`` on mbarriers, several chunks in flight) against the shipped one-token op and dense ``F.linear``, side
by side in one run: a correctness pass on awkward weights, then median µs (L2 flushed) over a sweep of its settings.
``bench/probe_stream.py`` had put the shipped kernel 10% behind its own access pattern read alone and that pattern
10% behind a flat stream of the same bytes; a first form staging by per-lane ``cp.async`` was slower (commit
db153a2, ``sparse_delta_cp_h200.json``).

    python3 bench/sparse_delta_tma.py --out $OUT/tma.json
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
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def padded(sp):
    """The packing with its group starts in a storage 16 bytes longer (the bulk copies read 16-byte spans)."""
    st = torch.zeros(sp.starts.numel() + 8, dtype=sp.starts.dtype, device=sp.starts.device)
    st[: sp.starts.numel()].copy_(sp.starts)
    sp.starts = st[: sp.starts.numel()]
    return sp


def check(rows: list) -> bool:
    ok = True
    torch.manual_seed(0)
    for n, k, s in [(100, 300, 0.7), (33, 129, 0.99), (4096, 4096, 0.7), (1024, 4096, 0.5), (257, 1000, 0.6),
                    (3000, 14336, 0.8), (500, 8192, 0.0)]:
        w = masked(n, k, s)
        w[: n // 4, : k // 3] = 0
        if n > 40:
            w[5] = 0
            w[6] = 0
            w[7] = torch.randn(k, device=DEV, dtype=w.dtype)
            w[n - 1] = 0
        sp = padded(pack(w))
        for xo in (0, 1):
            xs = torch.randn(1, k + 1, device=DEV, dtype=torch.bfloat16)
            x = xs[:, xo:xo + k]
            ref = F.linear(x.float(), w.float())
            for kw in ({}, {"unroll": 1, "chunk": 16}, {"stages": 4, "warps": 4, "per_sm": 0, "chunk": 64},
                       {"stages": 2, "per_sm": 1, "chunk": 8}):
                y = delta_cuda.spmv_tma(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k, **kw)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)) if y is not None else -1.0
                good = y is not None and err < 1e-2
                ok &= good
                if not good:
                    print("FAIL", n, k, s, xo, kw, err, flush=True)
                rows.append({"shape": [n, k], "sparsity": s, "settings": kw, "rel_err": err, "ok": good})
    print("correct:", ok, flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672,4096x4096,1024x4096,11008x4096,4096x11008,14336x4096")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", default="2:2,3,4:16,32,64:8x4,8x2,16x0,4x8,16x2",
                    help="unrolls:stages:chunks:warps x blocks per SM")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    checks: list = []
    delta_cuda._tma_kernel(0, 2, 3, 32)  # a compile error shows here, not as a None from spmv_tma
    if not a.no_check:
        check(checks)
        write_rows(a.out, checks=checks)
    parts = a.sweep.split(":")
    grid = [[int(v) for v in p.split(",")] for p in parts[:3]] + [[tuple(int(q) for q in v.split("x")) for v in parts[3].split(",")]]
    rows = []
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = padded(pack(w))
            x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            row = {"shape": [n, k], "sparsity": s, "batch": 1, "dense_us": timeit(lambda: F.linear(x, w), a.reps),
                   "delta_op_us": timeit(lambda: op(x, sp, n, k), a.reps),
                   "tma_us": timeit(lambda: delta_cuda.spmv_tma(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k), a.reps)}
            for u, st, ch, (wp, b) in itertools.product(*grid):
                fn = (lambda u=u, st=st, ch=ch, wp=wp, b=b: delta_cuda.spmv_tma(
                    x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k, unroll=u, stages=st, chunk=ch, warps=wp, per_sm=b))
                if fn() is not None:
                    row[f"tma_u{u}_s{st}_c{ch}_w{wp}_b{b}_us"] = timeit(fn, a.reps)
            tried = {key: v for key, v in row.items() if key.startswith("tma") and key.endswith("_us")}
            best = min(tried, key=tried.get)
            row.update(best=best, best_us=tried[best], speedup_op=row["dense_us"] / row["delta_op_us"],
                       speedup_tma=row["dense_us"] / row["tma_us"], speedup_best=row["dense_us"] / tried[best])
            rows.append(row)
            brief(row, "shape", "sparsity", "dense_us", "delta_op_us", "tma_us", "best", "best_us", "speedup_op",
                  "speedup_tma", "speedup_best")
            write_rows(a.out, checks=checks, linears=rows)


if __name__ == "__main__":
    main()
