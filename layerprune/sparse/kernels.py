"""Triton kernels for :mod:`layerprune.sparse.format` (tested on the CPU with ``TRITON_INTERPRET=1``).

``sparse_mm``: y = x · Wᵀ for a small batch (decode; B ≤ ``SMALL_BATCH``). For one or two tokens each lane
owns a 32-bit bitmask word and consumes one set bit per step (``ffs``; the word's first value offset
from a popcount prefix sum), so the work follows the nonzeros. For 3–64 tokens a program decodes a stack
of row blocks' (``bn`` × ``bk``) tiles into registers (a position's rank = popcount of the bits before
it; every position loads its own word, so the decode keeps one layout) and multiplies it on the tensor
cores (``tl.dot``, fp32 accumulate). Bytes read per weight: the format's 1/8 + d·2 (+ offsets).
Measured on the H200 (BENCHMARKS.md "Sparse inference"): the set-bit kernel reaches dense speed at 70%
and 1.3× at 80% for one token; the tile kernel 0.43–0.61× of dense at 4–16 tokens and 0.35–0.47× at 64
(bench/sparse_tile_v2.py; was 0.41–0.56× and 0.29–0.39×): its work is per weight position, not per nonzero.

On a CUDA device with bf16 weights the op runs :mod:`layerprune.sparse.bitmask_cuda` for 1–64 tokens instead (mma
fragments decoded in registers: 1.5–2.3× faster than these kernels at 4–16 tokens, side by side, session 20); these kernels
are its fallback (fp16/fp32, no NVRTC) and keep one token on the largest weights.

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
    def _decode_tiles(bm_ptr, val_ptr, off_ptr, t, ok, RB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      HW: tl.constexpr):
        """The dense (RB·BN × BK) stack of the ``RB`` tiles ``t`` (positions of tiles with ``ok`` false read as 0):
        each position's rank = its tile's offset + the popcounts of the rows and words before it + the
        popcount of the bits before it in its word; all ``RB`` tiles' loads are issued together."""
        NW: tl.constexpr = BK // 32
        tt = t[:, None, None, None]
        r = tl.arange(0, BN)[None, :, None, None]
        w = tl.arange(0, NW)[None, None, :, None]
        j = tl.arange(0, 32)[None, None, None, :]
        base = tl.load(off_ptr + t)
        # every position's lane loads its word (32 lanes to an address: a broadcast), so the positions keep
        # one layout from the words to the value gather (no pointer tensor moved through shared memory);
        # the word index is written as position >> 5 so that the compiler sees no contiguity along the
        # words and gives this load the value gather's layout
        words = tl.load(bm_ptr + tt * (BN * NW) + r * NW + ((w * 32 + j) >> 5))
        wcnt = tl.max(_popc(words, HW), axis=3)  # (RB, BN, NW): set bits of each word
        rowcnt = tl.sum(wcnt, axis=2)
        rowstart = tl.cumsum(rowcnt, axis=1) - rowcnt
        wstart = tl.cumsum(wcnt, axis=2) - wcnt
        rank = (base[:, None, None, None] + (rowstart[:, :, None] + wstart)[:, :, :, None]
                + _popc(words & ((1 << j) - 1), HW))
        m = (((words >> j) & 1) != 0) & ok[:, None, None, None]
        v = tl.load(val_ptr + rank, mask=m, other=0.0)
        return tl.reshape(v, (RB * BN, BK))

    @triton.jit
    def _sparse_mm_kernel(x_ptr, bm_ptr, val_ptr, off_ptr, y_ptr, B, N, K, KT, RBS, sxb, syb, SPLIT,
                          BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HW: tl.constexpr,
                          RB: tl.constexpr = 1, ATOMIC: tl.constexpr = False):
        """Decode for 3–64 tokens: tiles decoded to registers, multiplied on the tensor cores (``tl.dot``).

        A program owns ``RB`` consecutive row blocks (RB·BN output rows: one x tile serves them all, and the
        loads of RB tile decodes are in flight together). ``SPLIT`` > 1 (``ATOMIC``): split-K, program
        (g, bb, s) takes every SPLIT-th k-tile of its rows and adds its partial sums into an fp32 ``y`` with
        atomics."""
        g = tl.program_id(0)
        bb = tl.program_id(1)
        ks = tl.program_id(2)
        cols = tl.arange(0, BK)
        bidx = bb * BB + tl.arange(0, BB)
        rbs = g * RB + tl.arange(0, RB)
        rok = rbs < RBS
        rbc = tl.minimum(rbs, RBS - 1)
        acc = tl.zeros((BB, RB * BN), dtype=tl.float32)
        for kb in range(ks, KT, SPLIT):
            w = _decode_tiles(bm_ptr, val_ptr, off_ptr, rbc * KT + kb, rok, RB, BN, BK, HW)
            kidx = kb * BK + cols
            x = tl.load(x_ptr + bidx[:, None] * sxb + kidx[None, :], mask=(bidx[:, None] < B) & (kidx[None, :] < K),
                        other=0.0)
            acc += tl.dot(x.to(w.dtype), tl.trans(w))
        ridx = g * RB * BN + tl.arange(0, RB * BN)
        out = y_ptr + bidx[:, None] * syb + ridx[None, :]
        ok = (bidx[:, None] < B) & (ridx[None, :] < N)
        if ATOMIC:
            tl.atomic_add(out, acc, mask=ok)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _decompress_kernel(bm_ptr, val_ptr, off_ptr, w_ptr, N, K, KT, RBS, BN: tl.constexpr, BK: tl.constexpr,
                           HW: tl.constexpr, RB: tl.constexpr = 1):
        """Program (g, kb) writes the k-tile ``kb`` of row blocks g·RB … g·RB + RB − 1."""
        g = tl.program_id(0)
        kb = tl.program_id(1)
        rbs = g * RB + tl.arange(0, RB)
        rok = rbs < RBS
        w = _decode_tiles(bm_ptr, val_ptr, off_ptr, tl.minimum(rbs, RBS - 1) * KT + kb, rok, RB, BN, BK, HW)
        r = g * RB * BN + tl.arange(0, RB * BN)
        c = kb * BK + tl.arange(0, BK)
        tl.store(w_ptr + r[:, None].to(tl.int64) * K + c[None, :], w, mask=(r[:, None] < N) & (c[None, :] < K))


def _launch(num_warps: int, num_stages: int) -> dict:
    return {} if interpreted() else {"num_warps": num_warps, "num_stages": num_stages}


def tile_settings(n: int, k: int, b: int) -> tuple[int, int, int]:
    """(row blocks per program, split-K, warps) of the tile kernel for an n × k weight and b tokens
    (3 ≤ b ≤ ``SMALL_BATCH``): the settings with the best geometric-mean speed-up over six 7B/8B/70B shapes
    at 70% in bench/sparse_tile_v2.py's sweep on the H200 (4 and 16 tokens: 4 row blocks, split 8; 64
    tokens: 2 row blocks, split 4)."""
    return (4, 8, 4) if b <= 16 else (2, 4, 4)


def sparse_mm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int,
              bn: int, bk: int, tc: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, split_k: int | None = None, rb: int | None = None) -> torch.Tensor:
    """y (B × n) = x (B × k) · Wᵀ with W packed; x and values of one float dtype. B ≤ 2: the set-bit kernel
    (``tc`` tiles a step); 3 ≤ B ≤ ``SMALL_BATCH``: tiles decoded to registers and ``tl.dot``, ``rb`` row
    blocks a program, ``split_k`` programs a row group whose fp32 partial sums meet by atomic adds
    (``split_k=1``: no atomics); defaults from :func:`tile_settings`."""
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
    rb0, split0, nw0 = tile_settings(n, k, B)
    rb = rb or rb0
    bb = 16 if B <= 16 else 32 if B <= 32 else 64
    rbs = -(-n // bn)
    split = max(1, min(split_k or split0, kt))
    out = y if split == 1 else torch.zeros(B, n, dtype=torch.float32, device=x.device)
    _sparse_mm_kernel[(-(-rbs // rb), -(-B // bb), split)](x, bitmask, values, offsets, out, B, n, k, kt, rbs,
                                                           x.stride(0), out.stride(0), split, BB=bb, BN=bn, BK=bk,
                                                           HW=hw, RB=rb, ATOMIC=split > 1,
                                                           **_launch(num_warps or nw0, num_stages or 3))
    return y if split == 1 else out.to(x.dtype)


def decompress(bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int, bn: int,
               bk: int, rb: int = 1, num_warps: int = 1) -> torch.Tensor:
    """The dense (n × k) weight, ``rb`` row blocks × one k-tile a program, on the device (one row block and
    one warp: the best of bench/sparse_tile_v2.py's prefill sweep on five of six shapes, and within 1% on
    the sixth)."""
    w = torch.empty(n, k, dtype=values.dtype, device=values.device)
    kt = -(-k // bk)
    rbs = -(-n // bn)
    _decompress_kernel[(-(-rbs // rb), kt)](bitmask, values, offsets, w, n, k, kt, rbs, BN=bn, BK=bk,
                                            HW=not interpreted(), RB=rb, **_launch(num_warps, 2))
    return w
