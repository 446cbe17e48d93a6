"""CPU cost of calling a PyTorch op defined in Python, per call: registered with ``torch.library.Library`` (as
``layerprune/sparse/linear.py`` registers the sparse linear ops now) against the ``@torch.library.custom_op``
decorator (as before session 14), for an op whose kernel only allocates its output, next to calling that kernel
directly: the dispatch cost alone (the sparse op's own CPU kernel, ≈ 400 ± 50 µs, would hide it). Min and median
of 7 repetitions of ``--calls`` calls, no_grad.

    python3 bench/op_dispatch.py --out bench/results/cpu/op_dispatch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def per_call_us(fn, calls: int, reps: int = 7) -> dict:
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            for _ in range(20):
                fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            ts.append((time.perf_counter() - t) / calls * 1e6)
    return {"min_us": min(ts), "median_us": statistics.median(ts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()

    def empty(x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.empty_like(x)

    deco = torch.library.custom_op("lpbench::noop_deco", mutates_args=())(empty)
    deco.register_fake(lambda x, n: torch.empty_like(x))
    lib = torch.library.Library("lpbench", "DEF")
    lib.define("noop_lib(Tensor x, int n) -> Tensor")
    lib.impl("noop_lib", empty, "CompositeExplicitAutograd")
    t4 = torch.randn(4)
    rows = {"noop, @custom_op": per_call_us(lambda: torch.ops.lpbench.noop_deco(t4, 3), a.calls),
            "noop, Library": per_call_us(lambda: torch.ops.lpbench.noop_lib(t4, 3), a.calls),
            "noop, plain function": per_call_us(lambda: empty(t4, 3), a.calls)}
    for k, v in rows.items():
        print(f"{k}: min {v['min_us']:.1f} us, median {v['median_us']:.1f} us", flush=True)
    Path(a.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                       "cpus": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
