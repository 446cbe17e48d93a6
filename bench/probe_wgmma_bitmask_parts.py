"""Where the bitmask wgmma kernel's time goes: the same kernel timed whole, without its decode (constant A
registers), without its products (the decode kept live) and without either (copies, barriers, splits), beside dense
``F.linear``; median µs, L2 flushed.

    python3 bench/probe_wgmma_bitmask_parts.py --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import bitmask_wgmma, format as bformat  # noqa: E402
from sparse_decode import DEV, brief, masked, shape_list, timeit, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,28672x8192")
    ap.add_argument("--batches", default="16,64,2048")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    rows = []
    for n, k in shape_list(a.shapes):
        w = masked(n, k, 0.7)
        sb = bformat.pack(w)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            forms = ([{}, {"nwg": 2, "stages": 3}, {"nwg": 4, "stages": 3, "blocks_per_sm": 1.0},
                      {"nwg": 4, "stages": 2, "two": False, "blocks_per_sm": 1.0}] if b <= 64 else
                     [{"mt": 128, "nwg": 2, "stages": 3}, {"mt": 256, "nwg": 2, "stages": 2, "two": False}])
            for kw in [dict(f, swz=sw) for f in forms for sw in (False, True)]:
                row = {"shape": [n, k], "batch": b, "settings": kw, "dense_us": timeit(lambda: F.linear(x, w), a.reps)}
                for probe, name in ((0, "whole"), (1, "no_decode"), (2, "no_products"), (3, "neither")):
                    fn = (lambda probe=probe: bitmask_wgmma.spmm(x, sb.bitmask, sb.values, sb.offsets, n, k,
                                                                 probe=probe, **kw))
                    row[name + "_us"] = timeit(fn, a.reps) if fn() is not None else None
                rows.append(row)
                brief(row)
                write_rows(a.out, probe=rows)


if __name__ == "__main__":
    main()
