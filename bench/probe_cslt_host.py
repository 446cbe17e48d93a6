"""Host-side cost of one 2:4 prefill product and whether it waits for the GPU (session 29): for each path (dense
``F.linear``, nm24 unpack + cuBLAS, cuSPARSELt through :func:`layerprune.sparse.cslt.mm`, its conversion alone, and the
nm24 op as routed and with cuSPARSELt forced), the host µs of one call
with the GPU idle, and with ~30 ms of matmuls queued ahead (a call that returns long after the queue was filled
waits for the GPU, which in an eager, host-bound forward idles it).

    python3 bench/probe_cslt_host.py [--shape 14336x4096] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import cslt, linear, nm24, nm24_cuda  # noqa: E402


def forced(x, sp, n, k):
    """The nm24 op with every product sent to cuSPARSELt."""
    old = linear.CSLT_TOKENS, linear.CSLT_WEIGHTS
    linear.CSLT_TOKENS = linear.CSLT_WEIGHTS = 0  # every product that fits
    try:
        return linear.sparse_linear_nm24(x, sp.values, sp.meta, n, k)
    finally:
        linear.CSLT_TOKENS, linear.CSLT_WEIGHTS = old


def host_us(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return 1e6 * sorted(t)[len(t) // 2]


def under_load_us(fn, a: torch.Tensor) -> float:
    torch.cuda.synchronize()
    for _ in range(20):
        a @ a
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--tokens", type=int, default=512)
    a = ap.parse_args()
    n, k = (int(v) for v in a.shape.split("x"))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
    sp = nm24.pack(w)
    x = torch.randn(a.tokens, k, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    paths = {"dense": lambda: F.linear(x, w),
             "unpack_cublas": lambda: F.linear(x, nm24_cuda.unpack(sp.values, sp.meta, n, k)),
             "cslt_mm": lambda: cslt.mm(x, sp.values, sp.meta, n, k),
             "cslt_convert": lambda: cslt.convert(sp.values, sp.meta, n, k),
             "op_unpacked": lambda: linear.sparse_linear_nm24(x, sp.values, sp.meta, n, k),
             "op_cslt": lambda: forced(x, sp, n, k)}
    out = {"shape": [n, k], "tokens": a.tokens}
    for name, fn in paths.items():
        out[f"{name}_host_us"] = host_us(fn)
        out[f"{name}_under_load_host_us"] = under_load_us(fn, big)
    out["queued_matmuls_us"] = under_load_us(lambda: None, big)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
