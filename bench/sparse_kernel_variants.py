"""Decode-kernel variants for the bitmask format, timed side by side against F.linear on the H200.

    python bench/sparse_kernel_variants.py --out $OUT/kernel_variants.json

v1: per-position prefix sum (tl.cumsum) + tl.dot (the first kernel; ``run_v1``, now the tile kernel's decode);
v2: per-word popcount ranks (3-D tile: rows × words × 32 bits) + FMA reduction, no tensor cores;
v3: v2's decode with tl.dot for batches ≥ 8;
v4/v5: one lane per bitmask word consuming one set bit per step (v5 with ``ffs``; the kept 1–2-token kernel,
timed here through ``kernels.sparse_mm`` with explicit launch settings).
The raw results of each stage of the search are in bench/results/sparse_kernel_variants*_h200.json.
Rows: median µs over 100 calls, L2 flushed; the winner per (shape, batch) goes into layerprune/sparse/kernels.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import kernels  # noqa: E402
from layerprune.sparse.format import pack  # noqa: E402
from sparse_decode import timeit  # noqa: E402

DEV = torch.device("cuda")


@triton.jit
def _v2(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, sxb, syb,
        BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RPP: tl.constexpr):
    NW: tl.constexpr = BK // 32
    pid = tl.program_id(0)
    r = tl.arange(0, BN)[:, None, None]
    w = tl.arange(0, NW)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    low = (1 << j) - 1
    for rr in range(RPP):
        rb = pid * RPP + rr
        acc0 = tl.zeros((BN,), dtype=tl.float32)
        acc1 = tl.zeros((BN,), dtype=tl.float32)
        acc2 = tl.zeros((BN,), dtype=tl.float32)
        acc3 = tl.zeros((BN,), dtype=tl.float32)
        for kb in range(0, KT):
            t = rb * KT + kb
            base = tl.load(off_ptr + t)
            words = tl.load(bm_ptr + t * (BN * NW) + r * NW + w)  # (BN, NW, 1)
            pc = libdevice.popc(words)  # (BN, NW, 1)
            rowcnt = tl.sum(tl.sum(pc, axis=2), axis=1)  # (BN,)
            rowstart = tl.cumsum(rowcnt, axis=0) - rowcnt
            wpre = tl.cumsum(pc, axis=1) - pc  # (BN, NW, 1)
            bit = (words >> j) & 1
            rank = rowstart[:, None, None] + wpre + libdevice.popc(words & low)
            v = tl.load(val_ptr + base + rank, mask=bit != 0, other=0.0).to(tl.float32)
            kidx = kb * BK + w * 32 + j  # (1, NW, 32)
            km = kidx < K
            x0 = tl.load(x_ptr + kidx, mask=km, other=0.0).to(tl.float32)
            acc0 += tl.sum(tl.sum(v * x0, axis=2), axis=1)
            if BB > 1:
                x1 = tl.load(x_ptr + sxb + kidx, mask=km & (B > 1), other=0.0).to(tl.float32)
                acc1 += tl.sum(tl.sum(v * x1, axis=2), axis=1)
            if BB > 2:
                x2 = tl.load(x_ptr + 2 * sxb + kidx, mask=km & (B > 2), other=0.0).to(tl.float32)
                acc2 += tl.sum(tl.sum(v * x2, axis=2), axis=1)
                x3 = tl.load(x_ptr + 3 * sxb + kidx, mask=km & (B > 3), other=0.0).to(tl.float32)
                acc3 += tl.sum(tl.sum(v * x3, axis=2), axis=1)
        ridx = rb * BN + tl.arange(0, BN)
        rm = ridx < N
        tl.store(y_ptr + ridx, acc0.to(y_ptr.dtype.element_ty), mask=rm)
        if BB > 1:
            tl.store(y_ptr + syb + ridx, acc1.to(y_ptr.dtype.element_ty), mask=rm & (B > 1))
        if BB > 2:
            tl.store(y_ptr + 2 * syb + ridx, acc2.to(y_ptr.dtype.element_ty), mask=rm & (B > 2))
            tl.store(y_ptr + 3 * syb + ridx, acc3.to(y_ptr.dtype.element_ty), mask=rm & (B > 3))


@triton.jit
def _v3(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, sxb, syb,
        BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    NW: tl.constexpr = BK // 32
    rb = tl.program_id(0)
    bb = tl.program_id(1)
    r = tl.arange(0, BN)[:, None, None]
    w = tl.arange(0, NW)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    low = (1 << j) - 1
    bidx = bb * BB + tl.arange(0, BB)
    cols = tl.arange(0, BK)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for kb in range(0, KT):
        t = rb * KT + kb
        base = tl.load(off_ptr + t)
        words = tl.load(bm_ptr + t * (BN * NW) + r * NW + w)
        pc = libdevice.popc(words)
        rowcnt = tl.sum(tl.sum(pc, axis=2), axis=1)
        rowstart = tl.cumsum(rowcnt, axis=0) - rowcnt
        wpre = tl.cumsum(pc, axis=1) - pc
        bit = (words >> j) & 1
        rank = rowstart[:, None, None] + wpre + libdevice.popc(words & low)
        v = tl.load(val_ptr + base + rank, mask=bit != 0, other=0.0)
        v2 = tl.reshape(v, (BN, BK))
        kidx = kb * BK + cols
        x = tl.load(x_ptr + bidx[:, None] * sxb + kidx[None, :], mask=(bidx[:, None] < B) & (kidx[None, :] < K), other=0.0)
        acc += tl.dot(x.to(v2.dtype), tl.trans(v2))
    ridx = rb * BN + tl.arange(0, BN)
    tl.store(y_ptr + bidx[:, None] * syb + ridx[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(bidx[:, None] < B) & (ridx[None, :] < N))


def run_bits(x, sp, n, k, nw=8, ns=2, tc=16):
    """The set-bit kernel kept in layerprune/sparse/kernels.py (the earlier v4 was the same without ffs),
    with explicit launch settings."""
    return kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, tc, nw, ns)


def run_v1(x, sp, n, k, nw=4, ns=3):
    return kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, nw, ns)


def run_v2(x, sp, n, k, nw=4, ns=3, rpp=1):
    B = x.shape[0]
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    bb = 1 if B == 1 else 2 if B == 2 else 4
    kt = -(-k // sp.bk)
    rbs = -(-n // sp.bn)
    _v2[(rbs // rpp,)](x, sp.bitmask, sp.values, sp.offsets, y, B, n, k, kt, x.stride(0), y.stride(0),
                       BB=bb, BN=sp.bn, BK=sp.bk, RPP=rpp, num_warps=nw, num_stages=ns)
    return y


def run_v3(x, sp, n, k, nw=4, ns=3):
    B = x.shape[0]
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    bb = 16 if B <= 16 else 32 if B <= 32 else 64
    kt = -(-k // sp.bk)
    _v3[(-(-n // sp.bn), -(-B // bb))](x, sp.bitmask, sp.values, sp.offsets, y, B, n, k, kt, x.stride(0), y.stride(0),
                                       BB=bb, BN=sp.bn, BK=sp.bk, num_warps=nw, num_stages=ns)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for (n, k) in [(4096, 4096), (11008, 4096), (28672, 8192)]:
        for s in (0.5, 0.7, 0.8):
            w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
            w = w.masked_fill(torch.rand(n, k, device=DEV) < s, 0)
            sp = pack(w)
            for b in (1, 2, 16):
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                ref = F.linear(x, w).float()
                d = timeit(lambda: F.linear(x, w))
                cands = {}
                if b <= 2:
                    for nw in (4, 8, 16):
                        for tc in (16, 32, 64):
                            for ns in (1, 2):
                                cands[f"v5_w{nw}_t{tc}_s{ns}"] = (lambda nw=nw, tc=tc, ns=ns: run_bits(x, sp, n, k, nw, ns, tc))
                if b >= 16:
                    cands["v3_w4"] = lambda: run_v3(x, sp, n, k, 4)
                    cands["decompress+linear"] = lambda: F.linear(x, kernels.decompress(sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk))
                row = {"shape": [n, k], "sparsity": s, "batch": b, "dense_us": d}
                for name, fn in cands.items():
                    try:
                        err = float((fn().float() - ref).abs().max() / ref.abs().max())
                        row[name] = timeit(fn)
                        row[name + "_err"] = err
                    except Exception as e:  # noqa: BLE001
                        row[name] = None
                        row[name + "_error"] = str(e)[:200]
                best = min((v, kname) for kname, v in row.items() if kname.startswith("v") and not kname.endswith(("_err", "_error")) and v)
                row["best"] = best[1]
                row["best_speedup"] = d / best[0]
                rows.append(row)
                print(json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items() if not k2.endswith("_err")}), flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                       "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
