"""Launch settings of the delta format's decompress kernel and of the 1-2 token decode kernel beyond the first
sweep's edge (GP = 32), timed against F.linear and the bitmask format on the H200.

    python bench/sparse_delta_decompress.py --out $OUT/delta_decompress.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerprune.sparse import delta_kernels as dkernels, kernels  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402
from layerprune.sparse.format import pack as old_pack  # noqa: E402
from sparse_decode import masked, timeit  # noqa: E402

DEV = torch.device("cuda")


def decompress(sp, n, k, r, gp, nw, zero):
    w = (torch.zeros if zero else torch.empty)(n, k, dtype=sp.values.dtype, device=DEV)
    dkernels._decompress_kernel[(-(-n // r),)](*sp.buffers(), w, n, k, R=r, GP=gp, num_warps=nw, num_stages=2)
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    rows = []
    for (n, k) in [(4096, 4096), (28672, 8192)]:
        w = masked(n, k, 0.7)
        sp, osp = pack(w), old_pack(w)
        kt = -(-k // osp.bk)
        ref = {"shape": [n, k], "what": "reference",
               "memset_us": timeit(lambda: torch.zeros(n, k, dtype=w.dtype, device=DEV), a.reps),
               "copy_us": timeit(lambda: w.clone(), a.reps),
               "bitmask_decompress_us": timeit(lambda: kernels.decompress(osp.bitmask, osp.values, osp.offsets, n, k,
                                                                          osp.bn, osp.bk), a.reps)}
        rows.append(ref)
        print(json.dumps(ref), flush=True)
        for (r, gp, nw) in [(8, 4, 4), (2, 16, 2), (2, 16, 1), (4, 8, 4), (1, 32, 1), (1, 16, 1), (4, 16, 4), (16, 4, 4)]:
            for zero in (True, False):
                try:
                    ok = torch.equal(decompress(sp, n, k, r, gp, nw, True), w) if zero else None
                    t = timeit(lambda: decompress(sp, n, k, r, gp, nw, zero), a.reps)
                except Exception as e:  # noqa: BLE001
                    print("fail", r, gp, nw, str(e)[:200], file=sys.stderr)
                    continue
                rows.append({"shape": [n, k], "what": "decompress", "cfg": [r, gp, nw], "zero": zero, "us": t,
                             "exact": ok})
                print(json.dumps(rows[-1]), flush=True)
        for b in (1, 2):
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            d = timeit(lambda: F.linear(x, w), a.reps)
            for (r, gp, nw) in [(2, 16, 1), (2, 16, 2), (2, 32, 1), (2, 32, 2), (4, 32, 2), (1, 32, 1), (4, 16, 2),
                                (1, 64, 1), (2, 8, 1)]:
                try:
                    t = timeit(lambda: dkernels.sparse_mm(x, *sp.buffers(), n, k, r=r, gp=gp, num_warps=nw), a.reps)
                except Exception as e:  # noqa: BLE001
                    print("fail", r, gp, nw, str(e)[:200], file=sys.stderr)
                    continue
                rows.append({"shape": [n, k], "what": "decode", "batch": b, "cfg": [r, gp, nw], "dense_us": d,
                             "us": t, "speedup": d / t})
                print(json.dumps(rows[-1]), flush=True)
        del w, sp, osp
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
