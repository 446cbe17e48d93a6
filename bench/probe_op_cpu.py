"""CPU time per call against GPU time per call, dense ``F.linear`` and the sparse op (delta, 70%), at the token
counts of a prefill: does an eager prefill wait for the CPU? CPU µs: 200 calls issued back to back, the GPU kept
busy ahead of them (``torch.cuda._sleep``) so that no call waits for the GPU; GPU µs: ``timeit`` (events, L2
flushed, median).

    python3 bench/probe_op_cpu.py --out $OUT/op_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparse_decode import brief, one_token_cases, op, timeit, write_rows  # noqa: E402


def cpu_us(fn, calls: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU spin: the calls below are only queued
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    cpu = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,12288x4096,22016x4096,4096x11008")
    ap.add_argument("--batches", default="1,16,512,2048")
    a = ap.parse_args()
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, "0.7"):
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            fns = {"dense": lambda: F.linear(x, w), "sparse": lambda: op(x, sp, n, k)}
            row = {"shape": [n, k], "sparsity": s, "batch": b}
            for name, fn in fns.items():
                row[name + "_cpu_us"] = cpu_us(fn)
                row[name + "_gpu_us"] = timeit(fn, 20)
            rows.append(row)
            brief(row)
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
