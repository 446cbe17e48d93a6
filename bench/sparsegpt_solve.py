"""Time SparseGPT's OBS solve (``prune`` after the Hessian is built) on one block's worth of smollm2-135m
shaped linears, with a warm-up, on the device given.

    python bench/sparsegpt_solve.py [--device cuda] [--repeat 3]

Run it at two commits to compare implementations (BENCHMARKS.md gives the commits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.pruners.masks import Pattern  # noqa: E402
from layerprune.pruners.sparsegpt import SparseGPTPruner  # noqa: E402

# (in, out) of q, k, v, o, gate, up, down in one smollm2-135m block
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def one_block(pattern: Pattern, dev: torch.device) -> float:
    torch.manual_seed(0)
    total = 0.0
    for cin, cout in SHAPES:
        lin = torch.nn.Linear(cin, cout, bias=False, device=dev)
        x = torch.randn(4, 512, cin, device=dev) @ (torch.randn(cin, cin, device=dev) * 0.1)
        p = SparseGPTPruner(lin)
        p.add_batch(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        p.prune(pattern)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        total += time.perf_counter() - t
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__}
    for pat in (Pattern(0.5), Pattern(0.5, 2, 4)):
        one_block(pat, dev)  # warm-up
        ts = [one_block(pat, dev) for _ in range(a.repeat)]
        out["2:4" if pat.m else "unstructured 50%"] = {"seconds_per_block_min": min(ts), "all": ts}
    print(json.dumps(out, indent=1))
