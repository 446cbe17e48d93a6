"""Triton kernels for :mod:`layerprune.sparse.format` (tested on the CPU with ``TRITON_INTERPRET=1``).

``sparse_mm``: y = x · Wᵀ for a small batch (decode; B ≤ ``SMALL_BATCH``). For one or two tokens each lane
owns a 32-bit bitmask word and consumes one set bit per step (``ffs``; the word's first value offset
from a popcount prefix sum), so the work follows the nonzeros. For 3–64 tokens each (``bn`` × ``bk``)
tile is decoded into registers (a position's rank = popcount of the bits before it) and multiplied on
the tensor cores (``tl.dot``, fp32 accumulate). Bytes read per weight: the format's 1/8 + d·2 (+ offsets).
Measured on the H200 (BENCHMARKS.md "Sparse inference"): the set-bit kernel reaches dense speed at 70%
and 1.3× at 80% for one token; the tile kernel is 0.3–0.5× of dense — a hand-written CUDA decoder is
the open next step.

``decompress``: writes the dense weight tile by tile (same decode), for batches and prefills where a
cuBLAS matmul on the decompressed weight beats decoding per batch block.
"""

from __future__ import annotations

import torch

from layerprune.triton_support import HAVE_TRITON, interpreted, on_cpu, usable  # noqa: F401

if HAVE_TRITON:
    import triton
    import triton.language as tl

SMALL_BATCH = 64


if HAVE_TRITON:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover
        libdevice = None

    @triton.jit
    def _popc(x, HW: tl.constexpr):
        """Set bits of each int32 (hardware popc on the GPU; SWAR under the interpreter, which lacks libdevice)."""
        if HW:
            return libdevice.popc(x)
        else:
            u = x.to(tl.uint32, bitcast=True)
            u = u - ((u >> 1) & 0x55555555)
            u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
            u = (u + (u >> 4)) & 0x0F0F0F0F
            return ((u * 0x01010101) >> 24).to(tl.int32)

    @triton.jit
    def _ffs(x, HW: tl.constexpr):
        """1-based index of the lowest set bit (0 for 0)."""
        if HW:
            return libdevice.ffs(x)
        else:
            return tl.where(x != 0, _popc((x & (-x)) - 1, HW) + 1, 0)

    @triton.jit
    def _tile_offsets(bm_ptr, off_ptr, t, r, w, km, BN: tl.constexpr, NW: tl.constexpr, HW: tl.constexpr):
        """Words of tiles ``t`` and the value offset of each word's first nonzero (popcount prefix sums)."""
        base = tl.load(off_ptr + t, mask=km, other=0)
        words = tl.load(bm_ptr + t * (BN * NW) + r * NW + w, mask=km, other=0)
        pc = _popc(words, HW)
        rowcnt = tl.sum(pc, axis=2)
        rowstart = tl.cumsum(rowcnt, axis=0) - rowcnt
        return words, pc, base + rowstart[:, :, None] + tl.cumsum(pc, axis=2) - pc

    @triton.jit
    def _spmv_bits_kernel(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, sxb, syb,
                          BN: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr, BB: tl.constexpr,
                          HW: tl.constexpr):
        """Decode for 1–2 tokens. Each lane owns one 32-bit word of the bitmask (``TC`` tiles of a ``BN``-row
        block at a time) and, step by step, consumes its lowest set bit: the value is the word's next
        packed value, the column comes from ``ffs``. Work scales with the nonzeros, not the positions."""
        NW: tl.constexpr = BK // 32
        rb = tl.program_id(0)
        r = tl.arange(0, BN)[:, None, None]
        tc = tl.arange(0, TC)[None, :, None]
        w = tl.arange(0, NW)[None, None, :]
        acc0 = tl.zeros((BN, TC, NW), dtype=tl.float32)
        acc1 = tl.zeros((BN, TC, NW), dtype=tl.float32)
        for k0 in range(0, KT, TC):
            kb = k0 + tc
            km = kb < KT
            words, pc, off = _tile_offsets(bm_ptr, off_ptr, rb * KT + kb, r, w, km, BN, NW, HW)
            colbase = kb * BK + w * 32 - 1
            steps = tl.max(tl.max(tl.max(pc, axis=2), axis=1), axis=0)
            for _ in range(0, steps):
                nz = words != 0
                col = colbase + _ffs(words, HW)
                v = tl.load(val_ptr + off, mask=nz, other=0.0).to(tl.float32)
                acc0 += v * tl.load(x_ptr + col, mask=nz, other=0.0).to(tl.float32)
                if BB > 1:
                    acc1 += v * tl.load(x_ptr + sxb + col, mask=nz, other=0.0).to(tl.float32)
                words = words & (words - 1)
                off += 1
        ridx = rb * BN + tl.arange(0, BN)
        tl.store(y_ptr + ridx, tl.sum(tl.sum(acc0, axis=2), axis=1).to(y_ptr.dtype.element_ty), mask=ridx < N)
        if BB > 1:
            tl.store(y_ptr + syb + ridx, tl.sum(tl.sum(acc1, axis=2), axis=1).to(y_ptr.dtype.element_ty),
                     mask=ridx < N)

    @triton.jit
    def _decode_tile(bm_ptr, val_ptr, off_ptr, t, BN: tl.constexpr, BK: tl.constexpr, HW: tl.constexpr):
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
    def _sparse_mm_kernel(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, sxb, syb,
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
            w = _decode_tile(bm_ptr, val_ptr, off_ptr, rb * KT + kb, BN, BK, HW)
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
    def _decompress_kernel(bm_ptr, val_ptr, off_ptr, w_ptr, N, K, KT, BN: tl.constexpr, BK: tl.constexpr,
                           HW: tl.constexpr):
        t = tl.program_id(0)
        rb = t // KT
        kb = t % KT
        w = _decode_tile(bm_ptr, val_ptr, off_ptr, t, BN, BK, HW)
        r = rb * BN + tl.arange(0, BN)
        c = kb * BK + tl.arange(0, BK)
        tl.store(w_ptr + r[:, None] * K + c[None, :], w, mask=(r[:, None] < N) & (c[None, :] < K))


def _launch(num_warps: int, num_stages: int) -> dict:
    return {} if interpreted() else {"num_warps": num_warps, "num_stages": num_stages}


def sparse_mm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int,
              bn: int, bk: int, tc: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """y (B × n) = x (B × k) · Wᵀ with W packed; x and values of one float dtype. B ≤ 2: the set-bit kernel;
    3 ≤ B ≤ ``SMALL_BATCH``: tiles decoded to registers and ``tl.dot`` (launch settings measured on the H200,
    bench/sparse_kernel_variants.py). ``split_k`` (3 ≤ B): the tiles of a row block are shared by
    ``split_k`` programs whose fp32 partial sums meet by atomic adds. Default 4 for B ≤ 16 and 2 above: the
    best of bench/sparse_splitk.py on the H200 at 70% (4096×4096, 4 tokens: 53.0 → 33.6 µs; 28672×8192:
    315.5 → 299.3 µs; 64 tokens: split 2 best), ``split_k=1`` the single-program kernel."""
    B = x.shape[0]
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    kt = -(-k // bk)
    hw = not interpreted()
    if B <= 2:  # tiles per step and warps: the best of bench/sparse_kernel_variants.py's sweep on the H200
        tc = tc or (32 if n <= 4096 else 16)
        nw = num_warps or (16 if n <= 4096 else 8)
        _spmv_bits_kernel[(-(-n // bn),)](x, bitmask, values, offsets, y, B, n, k, kt, x.stride(0), y.stride(0),
                                          BN=bn, BK=bk, TC=tc, BB=B, HW=hw, **_launch(nw, num_stages or 1))
        return y
    bb = 16 if B <= 16 else 32 if B <= 32 else 64
    split = max(1, min(split_k or (4 if B <= 16 else 2), kt))
    out = y if split == 1 else torch.zeros(B, n, dtype=torch.float32, device=x.device)
    _sparse_mm_kernel[(-(-n // bn), -(-B // bb), split)](x, bitmask, values, offsets, out, B, n, k, kt, x.stride(0),
                                                         out.stride(0), BB=bb, BN=bn, BK=bk, HW=hw, SPLIT=split,
                                                         **_launch(num_warps or 4, num_stages or 3))
    return y if split == 1 else out.to(x.dtype)


def decompress(bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int, bn: int,
               bk: int) -> torch.Tensor:
    """The dense (n × k) weight, tile by tile on the device."""
    w = torch.empty(n, k, dtype=values.dtype, device=values.device)
    kt = -(-k // bk)
    _decompress_kernel[(-(-n // bn) * kt,)](bitmask, values, offsets, w, n, k, kt, BN=bn, BK=bk,
                                             HW=not interpreted(), **_launch(4, 2))
    return w
