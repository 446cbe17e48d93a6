"""One sparse-linear call under Nsight Compute: where a decode kernel's time goes (issue slots, L1 wavefronts,
stall reasons), next to dense ``F.linear`` on the same shape.

    ncu --target-processes all -k regex:'_spmv|_tile|gemv|gemm' --launch-skip 5 --launch-count 3 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \\
        python3 bench/probe_sparse_ncu.py --shape 28672x8192 --sparsity 0.7 --batch 1 --layout delta

The call repeats ``--calls`` times (ncu skips the first launches: JIT and warm-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import layerprune.sparse.linear  # noqa: E402,F401  (registers the ops)
from layerprune.sparse import delta, delta_kernels, kernels  # noqa: E402
from layerprune.sparse.format import pack  # noqa: E402
from sparse_decode import masked  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layout", default="delta", choices=("delta", "bitmask", "dense"))
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--delta-kernel", default="lane", choices=("lane", "bcast", "pf", "auto", "cuda", "tile"),
                    help="one token, delta: the lane kernel (session 12's profile), the broadcast one, the prefetching "
                         "one, the op's choice, the CUDA kernel (delta_cuda, settings from --cuda) or its tensor-core tile "
                         "kernel (delta_cuda.spmm_tile)")
    ap.add_argument("--bitmask-kernel", default="op", choices=("op", "triton"),
                    help="bitmask layout: the op's kernel (bitmask_cuda's tensor-core kernel on CUDA + bf16) or Triton's")
    ap.add_argument("--cuda", default="", help="the CUDA kernel's unroll, warps, blocks per SM (0: a warp per row); "
                                                "default: delta_cuda.settings")
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split("x"))
    w = masked(n, k, a.sparsity)
    x = torch.randn(a.batch, k, device=w.device, dtype=torch.bfloat16)
    if a.layout == "delta":
        sp = delta.pack(w)
        if a.delta_kernel == "tile":
            from layerprune.sparse import delta_cuda

            cidx = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
            fn = lambda: delta_cuda.spmm_tile(x, sp.values, sp.deltas, sp.starts, cidx, n, k)  # noqa: E731
        elif a.delta_kernel == "cuda":
            from layerprune.sparse import delta_cuda

            u, nw, per_sm = (int(v) for v in a.cuda.split(",")) if a.cuda else delta_cuda.settings(n, k)
            fn = lambda: delta_cuda.spmv(x, *sp.buffers(), n, k, unroll=u, warps=nw, per_sm=per_sm)  # noqa: E731
        elif a.delta_kernel == "pf":  # the Triton prefetching kernel
            fn = lambda: delta_kernels.sparse_mm(x, *sp.buffers(), n, k, prefetch=True)  # noqa: E731
        else:
            bc = {"lane": False, "bcast": True, "auto": None}[a.delta_kernel]
            fn = lambda: delta_kernels.sparse_mm(x, *sp.buffers(), n, k, bcast=bc)  # noqa: E731
    elif a.layout == "bitmask":
        sp = pack(w)
        if a.bitmask_kernel == "triton":
            fn = lambda: kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk)  # noqa: E731
        else:
            fn = lambda: torch.ops.layerprune.sparse_linear(x, sp.bitmask, sp.values, sp.offsets, n, k,  # noqa: E731
                                                            sp.bn, sp.bk)
    else:
        fn = lambda: F.linear(x, w)  # noqa: E731
    ref = F.linear(x, w).float()
    err = float((fn().float() - ref).abs().max() / ref.abs().max())
    for _ in range(a.calls):
        fn()
    torch.cuda.synchronize()
    print(f"{a.layout} {n}x{k} s={a.sparsity} b={a.batch}: max rel err {err:.2e}")


if __name__ == "__main__":
    main()
