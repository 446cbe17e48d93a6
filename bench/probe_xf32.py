"""One token through the delta gather kernel with x in shared memory as bf16 (shipped) or as fp32 (``xf``: no
conversion per entry), side by side on the GPU (session 27).

    python3 bench/probe_xf32.py --out $OUT/xf32.json [--sass $OUT]

Per shape × sparsity: dense ``F.linear`` and ``delta_cuda.spmv`` both ways over a few launch settings, timed as
``bench/sparse_decode.py`` times (CUDA events, L2 flushed, median of --reps); the two outputs must be equal bit for bit.
``--sass DIR``: also the two builds' SASS (nvcc + cuobjdump) and their instruction counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_decode import DEV, SHAPES, masked, timeit, write_rows  # noqa: E402

from layerprune.sparse import delta, delta_cuda  # noqa: E402


def sass(out: Path) -> dict:
    counts = {}
    for xf in (0, 1):
        src = out / f"spmv_xf{xf}.cu"
        src.write_text(delta_cuda.source(2, 1, 16, delta_cuda.TILE, bool(xf)).replace('extern "C"', 'extern "C"'))
        cub = out / f"spmv_xf{xf}.cubin"
        subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "--use_fast_math", "-o", str(cub), str(src)], check=True)
        text = subprocess.run(["cuobjdump", "-sass", "-fun", "delta_spmv_bf16", str(cub)], capture_output=True,
                              text=True, check=True).stdout
        (out / f"spmv_xf{xf}.sass").write_text(text)
        ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", text))
        counts[f"xf{xf}"] = {"total": sum(ops.values()), **dict(ops.most_common(25))}
        src.unlink()
        cub.unlink()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsities", default="0.5,0.7,0.8")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--sass", default="")
    a = ap.parse_args()
    extra = {}
    if a.sass:
        try:
            extra["sass_counts"] = sass(Path(a.sass))
            print(json.dumps(extra["sass_counts"]), flush=True)
        except Exception as e:  # noqa: BLE001
            print("sass:", e, file=sys.stderr)
    rows = []
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            for s in (float(v) for v in a.sparsities.split(",")):
                torch.manual_seed(0)
                w = masked(n, k, s)
                sp = delta.pack(w)
                x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
                u0, w0, b0 = delta_cuda.settings(n, k, 1)
                variants = {"bf16": dict(xf=False), "xf": dict(xf=True)}
                if k > 8192:
                    variants["xf_w32"] = dict(xf=True, warps=32)
                variants["xf_u4"] = dict(xf=True, unroll=4)
                row = {"model": model, "shape": [n, k], "sparsity": s, "batch": 1,
                       "dense_us": timeit(lambda: F.linear(x, w), a.reps)}
                ref = delta_cuda.spmv(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k)
                for name, kw in variants.items():
                    def fn(kw=kw):
                        return delta_cuda.spmv(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k, **kw)
                    row[name + "_same"] = bool(torch.equal(fn(), ref))
                    row[name + "_us"] = timeit(fn, a.reps)
                    row[name + "_speedup"] = row["dense_us"] / row[name + "_us"]
                rows.append(row)
                print(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
                del w, sp
    write_rows(a.out, linears=rows, **extra)


if __name__ == "__main__":
    main()
