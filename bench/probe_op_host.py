"""Host time of one sparse linear call at prefill sizes, against ``F.linear``: the question behind the 512-token
prefill (``probe_prefill_split.py``: the sparse model's GPU kernels take 16 ms of a 64 ms prefill, the dense
model's 11 of 37, so the host decides). Per shape, tokens and path: ``host_us`` = the host's time per call over
``--calls`` calls issued back to back (the GPU work is queued, not waited for, except where the path syncs),
``wall_us`` = the same calls to the last one's end, and the profile of those calls (cProfile, top functions by
own time).

    python3 bench/probe_op_host.py --out $OUT/op_host.json [--tokens 512,2048] [--calls 200]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def host_time(fn, calls: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / calls * 1e6
    return host, wall


def profiled(fn, calls: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,12288x4096,4096x11008")
    ap.add_argument("--tokens", default="1,4,512,2048")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    from layerprune.pruners.masks import nm_mask
    from layerprune.sparse.linear import SparseLinear

    rows = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w70 = w.masked_fill(torch.rand(n, k, device="cuda") < 0.7, 0)
        w24 = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
        mods = {}
        for name, ww, layout in (("delta70", w70, "delta"), ("nm24", w24, "nm24")):
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(ww)
            mods[name] = SparseLinear.from_linear(lin, layout)
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            fns = {"dense": lambda: F.linear(x, w70), **{nm: (lambda m=m: m(x)) for nm, m in mods.items()}}
            row = {"shape": [n, k], "tokens": t}
            with torch.no_grad():
                for name, fn in fns.items():
                    h, wl = host_time(fn, a.calls)
                    row[f"{name}_host_us"], row[f"{name}_wall_us"] = h, wl
                    if name != "dense":
                        row[f"{name}_profile"] = profiled(fn, a.calls)
            rows.append(row)
            print(json.dumps({kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in row.items()
                              if not kk.endswith("profile")}), flush=True)
            Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                               "calls": a.calls, "rows": rows}, indent=1))
    for r in rows[:2]:
        print(r["shape"], r["tokens"], "delta70 profile:\n", r["delta70_profile"][:2500], flush=True)


if __name__ == "__main__":
    main()
