"""layerprune's sparse kernels under Nsight Compute (one H200), beside dense ``F.linear``: where their time goes.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats -k regex:"nm24|delta|gemm|nvjet|sm90" python3 bench/ncu_sparse.py [--part nm24|delta]

``nm24``: 2:4 weights at 64 tokens, the nm24 kernel in three settings. ``delta``: 70% unstructured weights at one
token through the op (the delta layout's decode kernel).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import delta, nm24, nm24_cuda  # noqa: E402
from layerprune.sparse import linear  # noqa: E402,F401  (registers the ops)

ap = argparse.ArgumentParser()
ap.add_argument("--part", default="nm24")
a = ap.parse_args()
if a.part == "nm24":
    for n, k in [(4096, 4096), (28672, 8192)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
        sp = nm24.pack(w)
        x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
        for v in [None, (1, 8, 4, 512), (1, 8, 4, 256, 4)]:
            print(n, k, v, flush=True)
            nm24_cuda.spmm(x, sp.values, sp.meta, n, k, v)
        torch.nn.functional.linear(x, w)
else:
    for n, k in [(4096, 11008), (8192, 28672)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = w.masked_fill(torch.rand(n, k, device="cuda") < 0.7, 0)
        sp = delta.pack(w)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        print(n, k, flush=True)
        torch.ops.layerprune.sparse_linear_delta(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k)
        torch.nn.functional.linear(x, w)
torch.cuda.synchronize()
