"""Past the decode kernels' batches, unpack + cuBLAS a block of rows at a time into one reused workspace, against
unpacking the whole weight (the op's path) and dense ``F.linear``. Hypothesis: a workspace of a few MB stays in
L2, so cuBLAS reads the unpacked rows from L2 and the unpack's writes need not reach DRAM; the whole-weight
unpack writes and re-reads 2 bytes per weight through DRAM. Each variant is timed as the replay of a CUDA graph
(its many launches would otherwise be timed as the CPU's pace) and dense also eagerly; median µs, L2 flushed.

    python3 bench/sparse_chunked.py --out $OUT/chunked.json
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


def chunked(x, sp, n, k, chunk_bytes, ws=None):
    rows = max(64, min(n, (chunk_bytes // (2 * k)) // 64 * 64))
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    ws = torch.empty(rows, k, dtype=x.dtype, device=x.device) if ws is None else ws
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = delta_cuda.unpack(sp.values, sp.deltas, sp.starts, sp.gptr[r0:r1 + 1], r1 - r0, k, out=ws[:r1 - r0])
        torch.mm(x, w.t(), out=y[:, r0:r1])
    return y


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096,14336x4096,4096x14336,"
                                        "8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--batches", default="32,64,2048")
    ap.add_argument("--mbs", default="4,8,16,32", help="workspace sizes in MB")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, a.sparsities):
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            ref = F.linear(x, w).float()
            fns = {"dense": lambda: F.linear(x, w),
                   "unpack_linear": lambda: F.linear(x, delta_cuda.unpack(*sp.buffers(), n, k))}
            for mb in (int(v) for v in a.mbs.split(",")):
                fns[f"chunked_{mb}mb"] = lambda mb=mb: chunked(x, sp, n, k, mb << 20)
            row = {"shape": [n, k], "sparsity": s, "batch": b, "dense_eager_us": timeit(fns["dense"], a.reps)}
            for name, fn in fns.items():
                g, out = graphed(fn)
                g.replay()
                torch.cuda.synchronize()
                row[name + "_err"] = float((out.float() - ref).abs().max() / ref.abs().max())
                row[name + "_us"] = timeit(g.replay, a.reps)
                del g
            for name in fns:
                row[name + "_speedup"] = row["dense_us"] / row[name + "_us"]
            rows.append(row)
            brief(row, "shape", "batch", "dense_us", *(f + "_speedup" for f in fns if f != "dense"))
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
