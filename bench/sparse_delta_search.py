"""The delta-format decode kernel (layerprune/sparse/dformat.py, dkernels.py): a launch-setting sweep, then a
side-by-side table against F.linear and the bitmask kernel, on the H200.

    python bench/sparse_delta_search.py --out $OUT/delta_search.json [--parts sweep,table]

Same protocol as bench/sparse_decode.py: CUDA events around the call only, L2 flushed before every call,
median of --reps calls, all methods interleaved in one run, bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerprune.sparse import delta_kernels as dkernels  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402
from layerprune.sparse.format import pack as old_pack  # noqa: E402
from sparse_decode import SHAPES, masked, timeit  # noqa: E402

DEV = torch.device("cuda")


def new_op(x, sp, n, k, cfg):
    if x.shape[0] <= dkernels.SMALL_BATCH:
        r, gp, nw, tx = cfg
        return dkernels.sparse_mm(x, *sp.buffers(), n, k, r=r, gp=gp, num_warps=nw, transpose_x=tx)
    return F.linear(x, dkernels.decompress(*sp.buffers(), n, k))


def old_op(x, sp, n, k):
    return torch.ops.layerprune.sparse_linear(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk)


def sweep(reps: int, batches: list[int]) -> list[dict]:
    rows = []
    for (n, k) in [(4096, 4096), (1024, 4096), (4096, 11008), (28672, 8192)]:
        w = masked(n, k, 0.7)
        sp = pack(w)
        for b in batches:
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            d = timeit(lambda: F.linear(x, w), reps)
            grid = itertools.product((2, 4, 8, 16, 32), (1, 2, 4, 8, 16), (1, 2, 4, 8), (False,)) if b == 1 else \
                itertools.product((2, 4, 8, 16), (1, 2, 4, 8), (2, 4, 8), (True,))
            for cfg in grid:
                if cfg[0] * cfg[1] * b > 512 or cfg[0] * cfg[1] * 8 * b < 32 * cfg[2]:
                    continue
                try:
                    y = new_op(x, sp, n, k, cfg).float()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    t = timeit(lambda: new_op(x, sp, n, k, cfg), reps)
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    print("fail", cfg, str(e)[:200], file=sys.stderr)
                    continue
                rows.append({"shape": [n, k], "batch": b, "cfg": list(cfg), "dense_us": d, "sparse_us": t,
                             "speedup": d / t, "rel_err": err})
                print(json.dumps(rows[-1]), flush=True)
        del w, sp
    return rows


def ab(reps: int) -> list[dict]:
    """The decode kernel with predicated loads (masked) against clamped indices + a select (unmasked), with x
    as it comes and transposed (tx), at the launch settings the op uses otherwise."""
    rows = []
    for (n, k) in [(4096, 4096), (11008, 4096), (28672, 8192), (8192, 28672)]:
        for s in (0.5, 0.7):
            w = masked(n, k, s)
            sp = pack(w)
            for b in (1, 2, 3, 4, 16):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                ref = F.linear(x, w).float()
                d = timeit(lambda: F.linear(x, w), reps)
                row = {"shape": [n, k], "sparsity": s, "batch": b, "dense_us": d}
                variants = (("masked", False, None), ("unmasked", True, None), ("masked_tx", False, True),
                            ("unmasked_tx", True, True))
                for name, um, tx in variants:
                    if tx and b == 1:
                        continue
                    f = lambda: dkernels.sparse_mm(x, *sp.buffers(), n, k, unmasked=um, transpose_x=tx)  # noqa: E731
                    row[name + "_err"] = float((f().float() - ref).abs().max() / ref.abs().max())
                    row[name + "_us"] = timeit(f, reps)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del w, sp
    return rows


def best_cfgs(sw: list[dict]) -> dict:
    """Best (R, GP, warps, transpose) per (row class, batch) by the sum of times over the sweep's shapes."""
    out = {}
    for cls, pick in (("small", lambda n: n <= 2048), ("large", lambda n: n > 2048)):
        for b in (1, 4, 16):
            tot: dict = {}
            for r in sw:
                if r["batch"] == b and pick(r["shape"][0]):
                    tot.setdefault(tuple(r["cfg"]), []).append(r["sparse_us"] / r["dense_us"])
            nshape = max((len(v) for v in tot.values()), default=0)
            cands = {c: sum(v) for c, v in tot.items() if len(v) == nshape}
            if cands:
                out[f"{cls}/{b}"] = list(min(cands, key=cands.get))
    return out


def table(reps: int, cfgs: dict, batches: list[int], sparsities: list, models: list[str]) -> list[dict]:
    rows = []
    for model, shapes in SHAPES.items():
        if model not in models:
            continue
        for (n, k) in shapes:
            for s in sparsities:
                w = masked(n, k, s)
                sp = pack(w)
                osp = old_pack(w)
                for b in batches:
                    x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                    cb = 1 if b == 1 else 4 if b <= 4 else 16
                    cfg = tuple(cfgs.get(f"{'small' if n <= 2048 else 'large'}/{cb}", (8, 2, 4, False)))
                    ref = F.linear(x, w).float()
                    err = float((new_op(x, sp, n, k, cfg).float() - ref).abs().max() / ref.abs().max())
                    d = timeit(lambda: F.linear(x, w), reps)
                    t = timeit(lambda: new_op(x, sp, n, k, cfg), reps)
                    o = timeit(lambda: old_op(x, osp, n, k), reps)
                    rows.append({"model": model, "shape": [n, k], "sparsity": s, "batch": b, "dense_us": d,
                                 "sparse_us": t, "speedup": d / t, "bitmask_us": o, "bitmask_speedup": d / o,
                                 "rel_err": err, "sparse_bytes": sp.nbytes(), "bitmask_bytes": osp.nbytes(),
                                 "dense_bytes": w.numel() * 2, "cfg": list(cfg),
                                 "path": "decode-kernel" if b <= dkernels.SMALL_BATCH else "decompress+cuBLAS"})
                    print(json.dumps(rows[-1]), flush=True)
                del w, sp, osp
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="sweep,table")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--batches", default="1,4,16,64,2048")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4")
    ap.add_argument("--sweep-batches", default="1,4,16")
    ap.add_argument("--shapes", default=None, help="comma list of model names in SHAPES for the table")
    ap.add_argument("--cfgs", default=None, help="JSON of best_cfgs() to skip the sweep")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16"}
    import triton

    res["triton"] = triton.__version__
    t0 = time.time()
    parts = a.parts.split(",")
    if "sweep" in parts:
        res["sweep"] = sweep(a.reps, [int(b) for b in a.sweep_batches.split(",")])
        res["best"] = best_cfgs(res["sweep"])
        print("best", res["best"], flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    if "ab" in parts:
        res["ab"] = ab(a.reps)
    cfgs = res.get("best") or (json.loads(a.cfgs) if a.cfgs else {})
    if "table" in parts:
        sps = [s if s == "2:4" else float(s) for s in a.sparsities.split(",")]
        res["table"] = table(a.reps, cfgs, [int(b) for b in a.batches.split(",")], sps,
                             a.shapes.split(",") if a.shapes else list(SHAPES))
    res["wall_s"] = time.time() - t0
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
