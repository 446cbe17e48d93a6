"""The bitmask layout's tile kernel for 3–64 tokens and its decompression, new against shipped, on the GPU.

    python3 bench/sparse_tile_v2.py --out $OUT/sparse_tile_v2.json

Hypothesis under test: the tile kernel as shipped (80d7608) took the same ~53 µs on 4096×4096 at 4, 16 and 64
tokens (0.33× of dense) because (a) Triton moved every position's 64-bit value pointer through shared memory
between the layout its bitmask words were loaded in and the layout of the value gather, and (b) each program
decoded one 16-row tile at a time (one tile's loads in flight, an x tile per 16 rows). ``kernels.py`` now loads
the words in the gather's layout (a broadcast load per position) and decodes ``rb`` row blocks at once.
Rows: median µs (L2 flushed) of dense ``F.linear``, the shipped kernel (``prev``, its split-K default) and each
(rb, split, warps) of the new one (named ``rb…_tc1_s…_w…``: the run in bench/results/sparse_tile_v2_h200.json,
at commit 2108009, also walked 2 k-tiles a step, ``tc2``, which no default kept and the kernel then lost); for ``--prefill`` tokens, decompression + ``F.linear``
shipped and new (rb, warps). Each with its max relative error against dense.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import kernels  # noqa: E402
from layerprune.sparse.format import pack  # noqa: E402
from layerprune.sparse.kernels import _popc  # noqa: E402
from sparse_decode import brief, masked, shape_list, variant_row, write_rows  # noqa: E402


# ---- the shipped tile kernel and decompression (80d7608), kept here as the side-by-side reference
@triton.jit
def _prev_decode_tile(bm_ptr, val_ptr, off_ptr, t, BN: tl.constexpr, BK: tl.constexpr, HW: tl.constexpr):
    """The dense (BN × BK) tile ``t``: each position's rank = the popcount of the bits before it."""
    NW: tl.constexpr = BK // 32
    r = tl.arange(0, BN)[:, None, None]
    w = tl.arange(0, NW)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    base = tl.load(off_ptr + t)
    words = tl.load(bm_ptr + t * (BN * NW) + r * NW + w)
    pc = _popc(words, HW)
    rowcnt = tl.sum(tl.sum(pc, axis=2), axis=1)
    rowstart = tl.cumsum(rowcnt, axis=0) - rowcnt
    rank = rowstart[:, None, None] + tl.cumsum(pc, axis=1) - pc + _popc(words & ((1 << j) - 1), HW)
    v = tl.load(val_ptr + base + rank, mask=((words >> j) & 1) != 0, other=0.0)
    return tl.reshape(v, (BN, BK))

@triton.jit
def _prev_mm_kernel(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, sxb, syb,
                      BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HW: tl.constexpr,
                      SPLIT: tl.constexpr = 1):
    """Decode for 3–64 tokens: tiles decoded to registers, multiplied on the tensor cores (``tl.dot``).
    ``SPLIT`` > 1: split-K, program (rb, bb, s) takes every SPLIT-th tile of its row block and adds its
    partial sums into an fp32 ``y`` with atomics (more programs, fewer dependent tile decodes each)."""
    rb = tl.program_id(0)
    bb = tl.program_id(1)
    ks = tl.program_id(2)
    cols = tl.arange(0, BK)
    bidx = bb * BB + tl.arange(0, BB)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for kb in range(ks, KT, SPLIT):
        w = _prev_decode_tile(bm_ptr, val_ptr, off_ptr, rb * KT + kb, BN, BK, HW)
        kidx = kb * BK + cols
        x = tl.load(x_ptr + bidx[:, None] * sxb + kidx[None, :], mask=(bidx[:, None] < B) & (kidx[None, :] < K),
                    other=0.0)
        acc += tl.dot(x.to(w.dtype), tl.trans(w))
    ridx = rb * BN + tl.arange(0, BN)
    out = y_ptr + bidx[:, None] * syb + ridx[None, :]
    ok = (bidx[:, None] < B) & (ridx[None, :] < N)
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok)

@triton.jit
def _prev_decompress_kernel(bm_ptr, val_ptr, off_ptr, w_ptr, N, K, KT, BN: tl.constexpr, BK: tl.constexpr,
                       HW: tl.constexpr):
    t = tl.program_id(0)
    rb = t // KT
    kb = t % KT
    w = _prev_decode_tile(bm_ptr, val_ptr, off_ptr, t, BN, BK, HW)
    r = rb * BN + tl.arange(0, BN)
    c = kb * BK + tl.arange(0, BK)
    tl.store(w_ptr + r[:, None] * K + c[None, :], w, mask=(r[:, None] < N) & (c[None, :] < K))


def prev_mm(x, sp, n, k):
    B = x.shape[0]
    kt = -(-k // sp.bk)
    bb = 16 if B <= 16 else 32 if B <= 32 else 64
    split = max(1, min(4 if B <= 16 else 2, kt))
    out = torch.zeros(B, n, dtype=torch.float32, device=x.device)
    _prev_mm_kernel[(-(-n // sp.bn), -(-B // bb), split)](x, sp.bitmask, sp.values, sp.offsets, out, B, n, k, kt,
                                                          x.stride(0), out.stride(0), BB=bb, BN=sp.bn, BK=sp.bk,
                                                          HW=True, SPLIT=split, num_warps=4, num_stages=3)
    return out.to(x.dtype)


def prev_decompress(sp, n, k):
    w = torch.empty(n, k, dtype=sp.values.dtype, device=sp.values.device)
    kt = -(-k // sp.bk)
    _prev_decompress_kernel[(-(-n // sp.bn) * kt,)](sp.bitmask, sp.values, sp.offsets, w, n, k, kt, BN=sp.bn,
                                                    BK=sp.bk, HW=True, num_warps=4, num_stages=2)
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096,28672x8192,8192x28672")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--batches", default="4,16,64")
    ap.add_argument("--rbs", default="1,2,4,8")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows, pre = [], []
    keys = ("shape", "batch", "dense_us", "prev", "prev_speedup", "best", "best_speedup")
    for n, k in shape_list(a.shapes):
        for s in (float(v) for v in a.sparsities.split(",")):
            w = masked(n, k, s)
            sp = pack(w)
            for b in ints(a.batches):
                x = torch.randn(b, k, device=w.device, dtype=torch.bfloat16)
                variants = {"prev": lambda: prev_mm(x, sp, n, k)}
                for rb, split, nw in itertools.product(ints(a.rbs), ints(a.splits), ints(a.warps)):
                    variants[f"rb{rb}_tc1_s{split}_w{nw}"] = (
                        lambda rb=rb, split=split, nw=nw: kernels.sparse_mm(
                            x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, num_warps=nw, split_k=split,
                            rb=rb))
                row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=b)
                row["prev_speedup"] = row["dense_us"] / row["prev"]
                rows.append(row)
                brief(row, *keys)
                write_rows(a.out, rows=rows, prefill=pre)
            if a.prefill:
                x = torch.randn(a.prefill, k, device=w.device, dtype=torch.bfloat16)
                variants = {"prev": lambda: F.linear(x, prev_decompress(sp, n, k))}
                for rb, nw in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
                    variants[f"rb{rb}_w{nw}"] = lambda rb=rb, nw=nw: F.linear(
                        x, kernels.decompress(sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, rb=rb,
                                              num_warps=nw))
                row = variant_row(x, w, variants, a.reps, shape=[n, k], sparsity=s, batch=a.prefill)
                row["prev_speedup"] = row["dense_us"] / row["prev"]
                pre.append(row)
                brief(row, *keys)
                write_rows(a.out, rows=rows, prefill=pre)


if __name__ == "__main__":
    main()
