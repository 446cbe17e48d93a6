"""The one-token CUDA kernel for the delta layout (``layerprune/sparse/delta_cuda.py``: x in shared memory,
compiled with NVRTC) side by side with the Triton choice (``delta_kernels.sparse_mm(cuda=False)``), the op's
default (``shipped``) and ``F.linear``, over the CUDA kernel's launch settings. Hypothesis (Nsight Compute, session 12: the Triton kernels' main stall
is the L1TEX scoreboard, x gathered from global memory): gathers from shared memory take the one-token product
closer to the bytes it moves. Rows: median µs over ``--reps`` calls, L2 flushed; each variant's max relative
error against dense.

    python3 bench/sparse_delta_cuda.py --out $OUT/cuda.json

Session 14's runs (raw JSON in bench/results/): ``sparse_delta_cuda_v1_h200.json`` (first design: 2 or 4
entries per lane, every lane computing all four quarters' prefix sums; slower than Triton),
``sparse_delta_cuda_epl_h200.json`` (8 entries per lane added: faster) and ``sparse_delta_cuda_h200.json`` (the
8-entry design over unroll × warps × grid) and ``sparse_delta_cuda_pipelined_h200.json`` (that kernel,
``cuda_e8_*``, side by side with its software-pipelined form, ``cudapf_*``: the sweep behind
``delta_cuda.settings``), and ``sparse_delta_cuda_split_h200.json`` (2 or 4 warps sharing a row, ``_s2``/``_s4``:
no faster, removed). Those ran earlier versions of this script (``--epls``, ``--kernels``, ``--splits``
options); the library keeps the pipelined 8-entry kernel only, named ``cudapf_*`` here as in those files.

Session 15: ``--batches`` times the kernel's several-token passes (``sparse_delta_cuda_tokens_h200.json``: warps
× grids, ``cN`` = N blocks per SM capped at a warp per row, since then the library's only form of a persistent
grid; ``sparse_delta_cuda_w24_h200.json``,
``sparse_delta_cuda_cap_h200.json``), ``--unpack`` the CUDA unpack kernel + ``F.linear`` against Triton's scatter
(``sparse_delta_cuda_unpack_h200.json``), ``--skew`` the default settings with and without x's skewed slots
(``sparse_delta_cuda_skew_h200.json``). ``sparse_delta_cuda_lb8_h200.json`` ran a 64-register build for eight
tokens (reverted: slower).

Session 16: ``--tile WB:MW:KC:U:S,...`` times the tensor-core tile kernel (``delta_cuda.spmm_tile``) at those tile
shapes, unrolls and splits, with unpack + ``F.linear`` beside it (``--gather`` adds the gather kernel). The runs:
``sparse_delta_tile_v1_h200.json`` (the first form beside session 15's tensor-core kernel ``delta_mma_bf16``,
since removed, and an earlier form of this option), ``sparse_delta_tile_v2_h200.json`` (the next chunk's loads
ahead and the in-kernel split reduction), ``sparse_delta_tile_shapes_h200.json`` (tile shapes at 16/32/64 tokens).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda, delta_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096,14336x4096,4096x14336,"
                                        "8192x8192,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--batches", default="1", help="tokens per call; > 1: the kernel's several-token passes")
    ap.add_argument("--unrolls", default="1,2,4")
    ap.add_argument("--warps", default="4,8,16", help="'' for none of the settings sweep")
    ap.add_argument("--grids", default="rows,4,8,16",
                    help="'rows' (a warp per row) or blocks per SM (N or cN, the same now: the library caps every "
                         "persistent grid at a warp per row)")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--unpack", action="store_true", help="also the unpack kernel + F.linear (and its time alone)")
    ap.add_argument("--skew", action="store_true", help="the default settings with and without x's skew")
    ap.add_argument("--gather", action="store_true", help="the gather kernel and unpack + F.linear beside --tile's")
    ap.add_argument("--tile", default="", help="the tensor-core tile kernel (delta_tile_bf16, with unpack + F.linear "
                    "beside it) at warps:mtiles:chunk:unroll:splits settings, e.g. '8:1:256:4:0,4:2:256:4:0' "
                    "(splits 0 = its default)")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from sparse_decode import brief, one_token_cases, op, timeit, variant_row, write_rows

    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    t = time.perf_counter()
    for u in ints(a.unrolls):
        assert delta_cuda.kernel(0, u) is not None, "the CUDA kernel did not compile"
    compile_s = time.perf_counter() - t
    rows = []
    for n, k, s, w, sp, x1 in one_token_cases(a.shapes, a.sparsities):
        cidx = {}
        for b in ints(a.batches):
            x = x1 if b == 1 else torch.randn(b, k, device=x1.device, dtype=x1.dtype)
            variants = {"shipped": lambda x=x: op(x, sp, n, k)}
            if b <= delta_kernels.SMALL_BATCH:
                variants["triton"] = lambda x=x: delta_kernels.sparse_mm(x, *sp.buffers(), n, k, cuda=False)
            if a.unpack or a.gather:  # the dense weight written by the CUDA unpack kernel, then cuBLAS
                variants["unpack_linear"] = lambda x=x: F.linear(x, delta_cuda.unpack(*sp.buffers(), n, k))
            if a.unpack:  # Triton's scatter beside it
                variants["triton_decompress_linear"] = lambda x=x: F.linear(x, delta_kernels.decompress(
                    *sp.buffers(), n, k, cuda=False))
            if a.gather:  # the gather kernel beside the tensor-core one
                variants["gather"] = lambda x=x: delta_cuda.spmv(x, *sp.buffers(), n, k)
            for st in [v for v in a.tile.split(",") if v]:  # the tensor-core tile kernel
                wb, mw, kc, u, spl = (int(v) for v in st.split(":"))
                if kc not in cidx:
                    cidx[kc] = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k, kc)
                variants.setdefault("unpack_linear", lambda x=x: F.linear(x, delta_cuda.unpack(*sp.buffers(), n, k)))
                variants[f"tile_{wb}_{mw}_{kc}_u{u}_s{spl}"] = (
                    lambda x=x, t=(wb, mw, kc), u=u, spl=spl, c=cidx[kc]: delta_cuda.spmm_tile(
                        x, sp.values, sp.deltas, sp.starts, c, n, k, splits=spl or None, tile=t, unroll=u))
            if a.skew:  # the default settings with x's shared-memory skew and without
                variants["cuda_skew"] = lambda x=x: delta_cuda.spmv(x, *sp.buffers(), n, k)
                variants["cuda_noskew"] = lambda x=x: delta_cuda.spmv(x, *sp.buffers(), n, k, skw=0)
            for u, nw, gr in itertools.product(ints(a.unrolls), ints(a.warps) if b <= 64 else [], a.grids.split(",")):
                per_sm = 0 if gr == "rows" else int(gr.lstrip("c"))
                variants[f"cudapf_u{u}_w{nw}_g{gr}"] = (lambda x=x, u=u, nw=nw, per_sm=per_sm:
                                                        delta_cuda.spmv(x, *sp.buffers(), n, k, unroll=u, warps=nw,
                                                                        per_sm=per_sm))
            row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=b,
                              tokens_per_pass=delta_cuda.tokens_per_pass(b, k, delta_cuda._props(0)[1]))
            if a.unpack and b == ints(a.batches)[0]:
                assert torch.equal(delta_cuda.unpack(*sp.buffers(), n, k), w), "unpack differs from the weight"
                row["unpack_us"] = timeit(lambda: delta_cuda.unpack(*sp.buffers(), n, k), a.reps)
                row["triton_decompress_us"] = timeit(lambda: delta_kernels.decompress(*sp.buffers(), n, k, cuda=False),
                                                     a.reps)
                row["unpack_gb_s"] = (w.numel() * 2 + sp.nbytes()) / row["unpack_us"] / 1e3
            row["shipped_speedup"] = row["dense_us"] / row["shipped"]
            if "triton" in row:
                row["triton_speedup"] = row["dense_us"] / row["triton"]
            cp = min(((row[v], v) for v in variants if v.startswith("cudapf")), default=None)
            if cp:
                row["best_cudapf"], row["best_cudapf_speedup"] = cp[1], row["dense_us"] / cp[0]
            row["max_cuda_err"] = max(row[v + "_err"] for v in variants
                                      if v.startswith(("cuda", "unpack", "gather", "tile")))
            rows.append(row)
            brief(row, "shape", "sparsity", "batch", "dense_us", "shipped_speedup", "triton_speedup", "best_cudapf",
                  "best_cudapf_speedup", "max_cuda_err", "unpack_linear", "unpack_us",
                  "triton_decompress_us", "unpack_gb_s", "cuda_skew", "cuda_noskew", "gather",
                  *(v for v in variants if v.startswith("tile")))
            write_rows(a.out, rows=rows, nvrtc_compile_s=compile_s)


if __name__ == "__main__":
    main()
