"""The nm24 kernels at 64 tokens under Nsight Compute (one H200), beside dense ``F.linear``: where their time goes.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats -k regex:"nm24|gemm|nvjet|sm90" python3 bench/ncu_nm24.py > $OUT/ncu.txt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import nm24, nm24_cuda  # noqa: E402

VARIANTS = [(1, 8, 4, 512), (1, 8, 4, 512, 1), (2, 8, 4, 512, 1)]

for n, k in [(4096, 4096), (28672, 8192)]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
    sp = nm24.pack(w)
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    for v in VARIANTS:
        print(n, k, v, flush=True)
        nm24_cuda.spmm(x, sp.values, sp.meta, n, k, v)
    torch.nn.functional.linear(x, w)
    torch.cuda.synchronize()
