"""Triton kernels for :mod:`layerprune.sparse.delta` (tested on the CPU with ``TRITON_INTERPRET=1``).

``sparse_mm``: y = x · Wᵀ for a small batch (decode, B ≤ ``SMALL_BATCH``). A program owns ``R`` rows and
walks their groups ``GP`` at a time (for 1–2 tokens without predicated loads: group indices clamped in
bounds, out-of-row groups zeroed by a select, padding columns clamped to K − 1, where their value is 0). A group's columns come without a cross-lane scan: its two 8-byte
delta words are split into four quarters of 8 entries, each quarter's nibbles + 1 spread one per byte
and multiplied by 0x0101…01, which leaves the running column count in every byte (SWAR prefix sum,
≤ 128 per byte); then x is gathered at the columns (L1/L2 hits: x is small) and multiplied in fp32.
The work follows the stored entries. For B ≥ 3 x is transposed first so that one gather fetches the
B values of a column. Launch settings: the best of bench/sparse_delta_search.py's sweep on the H200.

``_spmv_bcast_kernel``: one token on a wide weight (K ≥ ``WIDE_K``: LLaMA-2-70B's shapes). The kernel above
computes a group's SWAR words on one lane and moves them through shared memory to the eight lanes that own
the group's entries (eight layout conversions per loop step, Nsight Compute: L1-bound at 46% of DRAM
bandwidth). Here every entry lane loads its group's words itself (one address per group: a broadcast load)
and repeats the SWAR arithmetic: more instructions, no shared memory in the loop. Measured on the H200
(bench/sparse_delta_v2.py): 1.43 → 1.54–1.62× of dense on 28672×8192 at 70%, 1.36 → 1.48× on 8192×28672,
1.65 → 2.07–2.09× at 80%; a tie on 4096×11008 and 4096×14336, slower on K = 4096 (not used there).

``_spmv_pf_kernel``: one token on K < ``WIDE_K`` or N ≤ 4096 (every LLaMA-2-7B / Llama-3-8B shape). Nsight Compute put the
lane kernel's main stall on the L1TEX scoreboard at 25% of DRAM bandwidth on 4096×4096: each program waits
for one step's loads at a time. This kernel issues the next step's loads (starts, deltas, values) before
computing the current step's columns and gathers, so two steps are in flight (bench/sparse_delta_pf.py, at
70%: 4096×4096 1.38 → 1.48×, 11008×4096 1.32 → 1.45×, 14336×4096 1.42 → 1.46×, 1024×4096 1.10 → 1.25×; at
80% on 4096×11008 and 4096×14336, where the broadcast kernel ran before: 1.85 → 2.01× and 1.81 → 1.89×). On
the 70B shapes (N > 4096, K ≥ 8192) the broadcast kernel stays 0–7% faster. A variant with the group words
loaded in the lanes' layout as well (as the broadcast kernel does) measured within 1% of this one and was not
kept (bench/results/sparse_delta_pfb_h200.json, commit 714b38e).

On a CUDA device with bf16 weights, ``sparse_mm``'s default for up to ``CUDA_BATCH`` tokens is the CUDA kernel
of :mod:`layerprune.sparse.delta_cuda` (x in shared memory; at 70% 1.37–2.08× of dense for one token, 0.97–1.46×
for four, against these kernels' 1.1–1.5× and 0.6–0.7×, BENCHMARKS.md); these kernels remain its fallback (no
NVRTC, misaligned buffers) and the path for fp16/fp32; 9–16 bf16 tokens go to the CUDA tensor-core kernel
(``delta_cuda.spmm_tile``), and so do 17–32 (up to 64 on K > 12288) through :func:`tensor_cores`. An N:M weight
(``delta_cuda.regular``) whose 2–8 tokens the CUDA kernel would run without its skewed x (too wide for shared
memory: 4 tokens at K = 28672, 8 at K = 14336) goes to the tile kernel too, and so does a weight denser than
``DENSE_PASSES`` entries per weight whose tokens would take several such passes (5–8 at K = 28672).

``decompress``: the dense weight, for batches and prefills beyond ``SMALL_BATCH``: by default the CUDA unpack
kernel (rows built in shared memory), else zeros then one Triton scatter of the entries (scattered 2-byte stores:
3–7× slower than the CUDA kernel).
"""

from __future__ import annotations

from typing import Callable

import torch

from layerprune.triton_support import HAVE_TRITON, interpreted, on_cpu, usable  # noqa: F401

if HAVE_TRITON:
    import triton
    import triton.language as tl

SMALL_BATCH = 16
CUDA_BATCH = 8  # the CUDA kernel's default up to this many tokens (bench/sparse_delta_cuda.py --batches)
MMA_BATCH = 32  # then the tensor-core tile kernel up to this many tokens, and up to MMA_WIDE_BATCH on K > WIDE_MMA_K;
MMA_WIDE_BATCH = 64  # beyond, unpack + cuBLAS (bench/sparse_delta_cuda.py --tile, BENCHMARKS.md session 16: at 64
WIDE_MMA_K = 12288  # tokens the tile kernel wins on K = 14336 and 28672, loses on K = 4096-11008)
# entries per weight above which several unskewed passes of the gather kernel (5–8 tokens on K = 28672) lose to the
# tile kernel: 50% 0.44× against 0.54× of dense, 60% 0.54× against 0.57×, 70% level, 80% 0.89× against 0.73×
# (bench/results/sparse_regular_multipass_session26_h200.json)
DENSE_PASSES = 0.35
WIDE_K = 8192  # one token on K ≥ WIDE_K: the broadcast kernel (bench/sparse_delta_v2.py)

if HAVE_TRITON:
    _LO = tl.constexpr(0x0F0F0F0F0F0F0F0F)
    _ONE = tl.constexpr(0x0101010101010101)

    @triton.jit
    def _quarters(dl_ptr, gs_ptr, g, gm, UNMASKED: tl.constexpr = False):
        """Per group ``g``: the column before its first entry and, for each quarter of 8 entries, the running
        column counts packed one per byte (SWAR: nibbles + 1 spread to bytes, times 0x0101…01 = prefix sums
        in every byte, ≤ 128) plus the quarter's carry. No cross-lane scan: all of it is per-thread."""
        dp = dl_ptr.to(tl.pointer_type(tl.int64)) + g * 2
        if UNMASKED:  # g is in bounds (clamped by the caller); the caller zeroes the values of masked groups
            base = (tl.load(gs_ptr + g).to(tl.int32) & 0xFFFF) - 1
            w0 = tl.load(dp)
            w1 = tl.load(dp + 1)
        else:
            base = (tl.load(gs_ptr + g, mask=gm, other=0).to(tl.int32) & 0xFFFF) - 1
            w0 = tl.load(dp, mask=gm, other=0)
            w1 = tl.load(dp + 1, mask=gm, other=0)
        p0, p1, p2, p3, c1, c2, c3 = _swar(w0, w1)
        return base, p0, p1, p2, p3, c1, c2, c3

    @triton.jit
    def _swar(w0, w1):
        """A group's two delta words → per quarter the running column counts, one per byte, and the carries."""
        p0 = ((w0 & _LO) + _ONE) * _ONE  # entries 0-7 (low nibbles of bytes 0-7)
        p1 = ((w1 & _LO) + _ONE) * _ONE  # entries 8-15
        p2 = (((w0 >> 4) & _LO) + _ONE) * _ONE  # entries 16-23 (high nibbles of bytes 0-7)
        p3 = (((w1 >> 4) & _LO) + _ONE) * _ONE  # entries 24-31
        c1 = ((p0 >> 56) & 0xFF).to(tl.int32)
        c2 = c1 + ((p1 >> 56) & 0xFF).to(tl.int32)
        c3 = c2 + ((p2 >> 56) & 0xFF).to(tl.int32)
        return p0, p1, p2, p3, c1, c2, c3

    @triton.jit
    def _cols(base, p, c):
        """(R, GP, 8) columns of one quarter (a 64-bit shift per byte; taking the bytes from 32-bit halves
        instead measured no faster, bench/results/sparse_delta_ab_h200.json's ``unmasked32``)."""
        sh = (tl.arange(0, 8) * 8).to(tl.int64)
        return (base + c)[:, :, None] + ((p[:, :, None] >> sh[None, None, :]) & 0xFF).to(tl.int32)

    @triton.jit
    def _quarter_dot_u(x_ptr, val_ptr, g, gm, col, q: tl.constexpr, K, sxk, sxb, bs, BB: tl.constexpr):
        """``_quarter_dot`` without predicated loads: ``g`` is clamped in bounds, masked groups' values are
        zeroed by a select and columns past the row (padding) are clamped to K − 1 (their values are 0)."""
        i = tl.arange(0, 8)
        v = tl.load(val_ptr + g[:, :, None] * 32 + q * 8 + i[None, None, :]).to(tl.float32)
        v = tl.where(gm[:, :, None], v, 0.0)
        c = tl.minimum(col, K - 1)
        if BB == 1:
            return v * tl.load(x_ptr + c * sxk).to(tl.float32)
        else:
            xv = tl.load(x_ptr + c[:, :, :, None] * sxk + bs[None, None, None, :] * sxb).to(tl.float32)
            return v[:, :, :, None] * xv

    @triton.jit
    def _quarter_dot(x_ptr, val_ptr, g, gm, col, q: tl.constexpr, K, sxk, sxb, b, bm, BB: tl.constexpr):
        """Σ over the quarter's 8 entries of value × x[col] for each token: (R, GP, 8) if BB == 1 else
        (R, GP, 8, BB)."""
        i = tl.arange(0, 8)
        m = gm[:, :, None]
        v = tl.load(val_ptr + g[:, :, None] * 32 + q * 8 + i[None, None, :], mask=m, other=0.0).to(tl.float32)
        mc = m & (col < K)
        if BB == 1:
            return v * tl.load(x_ptr + col * sxk, mask=mc, other=0.0).to(tl.float32)
        else:
            xv = tl.load(x_ptr + col[:, :, :, None] * sxk + b[None, None, None, :] * sxb,
                         mask=mc[:, :, :, None] & bm[None, None, None, :], other=0.0).to(tl.float32)
            return v[:, :, :, None] * xv

    @triton.jit
    def _row_block(gp_ptr, N, R: tl.constexpr):
        """This program's ``R`` rows, their mask, first group and group count, and the most groups of any."""
        rows = tl.program_id(0) * R + tl.arange(0, R)
        rm = rows < N
        g0 = tl.load(gp_ptr + rows, mask=rm, other=0)
        ng = tl.load(gp_ptr + rows + 1, mask=rm, other=0) - g0
        return rows, rm, g0, ng, tl.max(ng, axis=0)

    @triton.jit
    def _spmv_kernel(x_ptr, val_ptr, dl_ptr, gs_ptr, gp_ptr, y_ptr, B, N, K, G, sxk, sxb, syb,
                     R: tl.constexpr, GP: tl.constexpr, BB: tl.constexpr, UNMASKED: tl.constexpr = True,
                     FULL: tl.constexpr = False):
        rows, rm, g0, ng, maxg = _row_block(gp_ptr, N, R)
        gpr = tl.arange(0, GP)
        b = tl.arange(0, BB)
        bm = b < B
        if FULL:  # B == BB: every token is real, and a token's x values stay contiguous (vector gathers)
            bs = b
        else:
            bs = tl.minimum(b, B - 1)  # tokens past B read token B − 1 (in bounds); they are never stored
        if BB == 1:
            acc = tl.zeros((R, GP, 8), dtype=tl.float32)
        else:
            acc = tl.zeros((R, GP, 8, BB), dtype=tl.float32)
        for it in range(0, maxg, GP):
            gi = it + gpr[None, :]
            gm = gi < ng[:, None]
            g = g0[:, None] + gi
            if UNMASKED:
                g = tl.minimum(g, G - 1)
                base, p0, p1, p2, p3, c1, c2, c3 = _quarters(dl_ptr, gs_ptr, g, gm, True)
                acc += _quarter_dot_u(x_ptr, val_ptr, g, gm, _cols(base, p0, 0), 0, K, sxk, sxb, bs, BB)
                acc += _quarter_dot_u(x_ptr, val_ptr, g, gm, _cols(base, p1, c1), 1, K, sxk, sxb, bs, BB)
                acc += _quarter_dot_u(x_ptr, val_ptr, g, gm, _cols(base, p2, c2), 2, K, sxk, sxb, bs, BB)
                acc += _quarter_dot_u(x_ptr, val_ptr, g, gm, _cols(base, p3, c3), 3, K, sxk, sxb, bs, BB)
            else:
                base, p0, p1, p2, p3, c1, c2, c3 = _quarters(dl_ptr, gs_ptr, g, gm)
                acc += _quarter_dot(x_ptr, val_ptr, g, gm, _cols(base, p0, 0), 0, K, sxk, sxb, b, bm, BB)
                acc += _quarter_dot(x_ptr, val_ptr, g, gm, _cols(base, p1, c1), 1, K, sxk, sxb, b, bm, BB)
                acc += _quarter_dot(x_ptr, val_ptr, g, gm, _cols(base, p2, c2), 2, K, sxk, sxb, b, bm, BB)
                acc += _quarter_dot(x_ptr, val_ptr, g, gm, _cols(base, p3, c3), 3, K, sxk, sxb, b, bm, BB)
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        if BB == 1:
            tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rm)
        else:
            tl.store(y_ptr + b[None, :] * syb + rows[:, None], out.to(y_ptr.dtype.element_ty),
                     mask=rm[:, None] & bm[None, :])

    @triton.jit
    def _spmv_bcast_kernel(x_ptr, val_ptr, dl_ptr, gs_ptr, gp_ptr, y_ptr, N, K, G,
                           R: tl.constexpr, GP: tl.constexpr, UNMASKED: tl.constexpr):
        """One token: ``_spmv_kernel`` with each group's words loaded by the lanes of its entries ((R, GP, 8)
        pointers, eight lanes to an address), so that no layout conversion sits in the loop."""
        rows, rm, g0, ng, maxg = _row_block(gp_ptr, N, R)
        gpr = tl.arange(0, GP)
        i8 = tl.arange(0, 8)[None, None, :]
        sh = (tl.arange(0, 8) * 8).to(tl.int64)[None, None, :]
        acc = tl.zeros((R, GP, 8), dtype=tl.float32)
        for it in range(0, maxg, GP):
            gi = it + gpr[None, :, None] + i8 * 0  # (1, GP, 8): loaded in the entries' layout
            gm = gi < ng[:, None, None]
            g = g0[:, None, None] + gi
            if UNMASKED:
                g = tl.minimum(g, G - 1)
            base, p0, p1, p2, p3, c1, c2, c3 = _quarters(dl_ptr, gs_ptr, g, gm, UNMASKED)
            vp = val_ptr + g * 32 + i8
            for q in tl.static_range(4):
                if q == 0:
                    col = base + ((p0 >> sh) & 0xFF).to(tl.int32)
                elif q == 1:
                    col = base + c1 + ((p1 >> sh) & 0xFF).to(tl.int32)
                elif q == 2:
                    col = base + c2 + ((p2 >> sh) & 0xFF).to(tl.int32)
                else:
                    col = base + c3 + ((p3 >> sh) & 0xFF).to(tl.int32)
                if UNMASKED:  # masked groups' values zeroed, padding columns clamped (their values are 0)
                    v = tl.where(gm, tl.load(vp + q * 8).to(tl.float32), 0.0)
                    acc += v * tl.load(x_ptr + tl.minimum(col, K - 1)).to(tl.float32)
                else:
                    v = tl.load(vp + q * 8, mask=gm, other=0.0).to(tl.float32)
                    acc += v * tl.load(x_ptr + col, mask=gm & (col < K), other=0.0).to(tl.float32)
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rm)

    @triton.jit
    def _group_loads(dl_ptr, gs_ptr, val_ptr, g):
        """A step's loads for groups ``g`` (in bounds): start, the two delta words, the four value quarters."""
        dp = dl_ptr.to(tl.pointer_type(tl.int64)) + g * 2
        i8 = tl.arange(0, 8)[None, None, :]
        vp = val_ptr + g[:, :, None] * 32 + i8
        return (tl.load(gs_ptr + g), tl.load(dp), tl.load(dp + 1), tl.load(vp), tl.load(vp + 8), tl.load(vp + 16),
                tl.load(vp + 24))

    @triton.jit
    def _spmv_pf_kernel(x_ptr, val_ptr, dl_ptr, gs_ptr, gp_ptr, y_ptr, N, K, G,
                        R: tl.constexpr, GP: tl.constexpr):
        """One token, ``_spmv_kernel``'s unpredicated arithmetic with the next step's loads (starts, deltas,
        values) issued before this step's columns and gathers are computed: two steps in flight per
        program instead of one, so a row's dependent DRAM round trips overlap."""
        rows, rm, g0, ng, maxg = _row_block(gp_ptr, N, R)
        gpr = tl.arange(0, GP)[None, :]
        acc = tl.zeros((R, GP, 8), dtype=tl.float32)
        gm = gpr < ng[:, None]
        s, w0, w1, v0, v1, v2, v3 = _group_loads(dl_ptr, gs_ptr, val_ptr, tl.minimum(g0[:, None] + gpr, G - 1))
        for it in range(0, maxg, GP):
            gmn = it + GP + gpr < ng[:, None]
            sn, w0n, w1n, v0n, v1n, v2n, v3n = _group_loads(dl_ptr, gs_ptr, val_ptr,
                                                            tl.minimum(g0[:, None] + it + GP + gpr, G - 1))
            base = (s.to(tl.int32) & 0xFFFF) - 1
            p0, p1, p2, p3, c1, c2, c3 = _swar(w0, w1)
            m = gm[:, :, None]
            acc += tl.where(m, v0.to(tl.float32), 0.0) * tl.load(
                x_ptr + tl.minimum(_cols(base, p0, 0), K - 1)).to(tl.float32)
            acc += tl.where(m, v1.to(tl.float32), 0.0) * tl.load(
                x_ptr + tl.minimum(_cols(base, p1, c1), K - 1)).to(tl.float32)
            acc += tl.where(m, v2.to(tl.float32), 0.0) * tl.load(
                x_ptr + tl.minimum(_cols(base, p2, c2), K - 1)).to(tl.float32)
            acc += tl.where(m, v3.to(tl.float32), 0.0) * tl.load(
                x_ptr + tl.minimum(_cols(base, p3, c3), K - 1)).to(tl.float32)
            s, w0, w1, v0, v1, v2, v3, gm = sn, w0n, w1n, v0n, v1n, v2n, v3n, gmn
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rm)

    @triton.jit
    def _scatter_quarter(val_ptr, wrow, g, gm, col, q: tl.constexpr, K):
        i = tl.arange(0, 8)
        m = gm[:, :, None]
        v = tl.load(val_ptr + g[:, :, None] * 32 + q * 8 + i[None, None, :], mask=m, other=0.0)
        tl.store(wrow + col, v, mask=m & (col < K))

    @triton.jit
    def _decompress_kernel(val_ptr, dl_ptr, gs_ptr, gp_ptr, w_ptr, N, K, R: tl.constexpr, GP: tl.constexpr):
        rows, rm, g0, ng, maxg = _row_block(gp_ptr, N, R)
        gpr = tl.arange(0, GP)
        wrow = w_ptr + rows.to(tl.int64)[:, None, None] * K
        for it in range(0, maxg, GP):
            gi = it + gpr[None, :]
            gm = gi < ng[:, None]
            g = g0[:, None] + gi
            base, p0, p1, p2, p3, c1, c2, c3 = _quarters(dl_ptr, gs_ptr, g, gm)
            _scatter_quarter(val_ptr, wrow, g, gm, _cols(base, p0, 0), 0, K)
            _scatter_quarter(val_ptr, wrow, g, gm, _cols(base, p1, c1), 1, K)
            _scatter_quarter(val_ptr, wrow, g, gm, _cols(base, p2, c2), 2, K)
            _scatter_quarter(val_ptr, wrow, g, gm, _cols(base, p3, c3), 3, K)


def _launch(num_warps: int, num_stages: int) -> dict:
    return {} if interpreted() else {"num_warps": num_warps, "num_stages": num_stages}


def settings(n: int, k: int, b: int) -> tuple[int, int, int, bool, bool]:
    """(rows per program, groups per row per step, warps, transpose x, unmasked) for an n × k weight and b
    tokens: the best of bench/sparse_delta_search.py's sweeps (1, 4, 8/16 tokens; its ``ab`` part for
    unmasked loads) and bench/sparse_delta_decompress.py (GP = 32, 2 tokens) on the H200."""
    if b == 1:
        return 2, 16, (2 if n <= 2048 else 1), False, k >= 8192
    if b == 2:
        return 2, 8, 1, False, True
    if b <= 4:  # 4 of 4 tokens: no padded token to clamp, so the unpredicated loads win (by 0–5%)
        return 2, 8, (4 if n <= 2048 else 2), True, b == 4
    return (2, 8, 2, True, False) if n <= 2048 else (4, 4, 2, True, False)


def bcast_settings(n: int, k: int) -> tuple[int, int, int]:
    """(rows per program, groups per row per step, warps) of the broadcast kernel: the best of
    bench/sparse_delta_v2.py on the H200 (one token, K ≥ 8192, 50–80%)."""
    if n <= 2048:
        return 1, 32, 1
    if n <= 4096:
        return 2, 16, 1
    return (4, 16, 2) if k > n else (2, 8, 1)


def pf_settings(n: int) -> tuple[int, int, int]:
    """(rows per program, groups per row per step, warps) of the prefetching one-token kernel: the best of
    bench/sparse_delta_pf.py on the H200 (K < 8192 or N ≤ 4096, 60–80%)."""
    return (1, 16, 1) if n <= 2048 else (2, 8, 1)


def sparse_mm(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor,
              n: int, k: int, r: int | None = None, gp: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, transpose_x: bool | None = None,
              unmasked: bool | None = None, bcast: bool | None = None, prefetch: bool | None = None,
              cuda: bool | None = None) -> torch.Tensor:
    """y (B × n) = x (B × k) · Wᵀ with W packed; x and values of one float dtype, B ≤ ``SMALL_BATCH``.
    bf16 on CUDA, when no Triton option is given: the CUDA gather kernel (:mod:`delta_cuda`) up to ``CUDA_BATCH``
    tokens (any B with ``cuda=True``), then its tensor-core kernel up to ``MMA_BATCH``. Otherwise Triton; one token:
    ``prefetch`` the prefetching kernel (by default when k < ``WIDE_K`` or n ≤ 4096 and no other kernel option is
    given), ``bcast`` the broadcast kernel (by default for the other shapes: k ≥ ``WIDE_K`` and n > 4096), else
    the lane kernel."""
    B = x.shape[0]
    G = starts.numel()
    if B == 0 or G == 0:  # no tokens, or a weight without nonzeros
        return torch.zeros(B, n, dtype=x.dtype, device=x.device)
    triton_asked = any(v is not None for v in (r, gp, num_warps, num_stages, transpose_x, unmasked, bcast, prefetch))
    if cuda if cuda is not None else not triton_asked:
        from layerprune.sparse import delta_cuda

        if delta_cuda.usable(x, values, deltas):
            if B <= CUDA_BATCH or cuda:
                y = None
                dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
                if not cuda and prefer_tile(B, n, k, values.numel(), delta_cuda._props(dev)[1],
                                            lambda: delta_cuda.regular(starts, gptr)):
                    y = tensor_cores(x, values, deltas, starts, gptr, n, k)
                if y is None:
                    y = delta_cuda.spmv(x, values, deltas, starts, gptr, n, k)
            else:
                y = tensor_cores(x, values, deltas, starts, gptr, n, k)
            if y is not None:
                return y
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if prefetch is None:  # the default one-token kernel (below WIDE_K, or ≤ 4096 rows), unless another is asked for
        prefetch = (k < WIDE_K or n <= 4096) and bcast is None and unmasked is None and transpose_x is None
    if B == 1 and prefetch:
        r0, gp0, nw0 = pf_settings(n)
        _spmv_pf_kernel[(-(-n // (r or r0)),)](x, values, deltas, starts, gptr, y, n, k, G, R=r or r0, GP=gp or gp0,
                                               **_launch(num_warps or nw0, num_stages or 1))
        return y
    if B == 1 and (k >= WIDE_K if bcast is None else bcast):
        r0, gp0, nw0 = bcast_settings(n, k)
        r, gp, nw = r or r0, gp or gp0, num_warps or nw0
        _spmv_bcast_kernel[(-(-n // r),)](x, values, deltas, starts, gptr, y, n, k, G, R=r, GP=gp,
                                          UNMASKED=settings(n, k, 1)[4] if unmasked is None else unmasked,
                                          **_launch(nw, num_stages or 2))
        return y
    r0, gp0, nw0, tx0, um0 = settings(n, k, B)
    r, gp, nw = r or r0, gp or gp0, num_warps or nw0
    unmasked = um0 if unmasked is None else unmasked
    if (tx0 if transpose_x is None else transpose_x) and B > 1:
        xt = x.t().contiguous()
        sxk, sxb, xx = B, 1, xt
    else:
        sxk, sxb, xx = x.stride(1), x.stride(0), x
    bb = max(1, triton.next_power_of_2(B))
    _spmv_kernel[(-(-n // r),)](xx, values, deltas, starts, gptr, y, B, n, k, G, sxk, sxb, y.stride(0),
                                R=r, GP=gp, BB=bb, UNMASKED=unmasked, FULL=B == bb,
                                **_launch(nw, num_stages or 2))
    return y


def prefer_tile(b: int, n: int, k: int, entries: int, limit: int, regular: Callable[[], bool]) -> bool:
    """Whether ``b`` (2–``CUDA_BATCH``) tokens of an n × k delta weight of ``entries`` entries go to the tile kernel
    rather than the CUDA gather kernel, whose pass would run without its skewed x (``delta_cuda.unskewed``: 4 tokens
    at k = 28672, 8 at 14336 in 227 KB): when the weight is N:M (``regular()``, asked only then), whose groups then
    gather from one bank, or when the tokens take several such passes of a weight denser than ``DENSE_PASSES``
    (BENCHMARKS.md, session 26)."""
    from layerprune.sparse import delta_cuda

    if b < 2 or not delta_cuda.unskewed(b, k, limit):
        return False
    several = delta_cuda.tokens_per_pass(b, k, limit) < b and entries > DENSE_PASSES * n * k
    return several or regular()


def tensor_cores(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor,
                 gptr: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """y = x · Wᵀ by the CUDA tensor-core tile kernel (``delta_cuda.spmm_tile``) for the batches where it beats
    unpack + cuBLAS (up to ``MMA_BATCH`` tokens; up to ``MMA_WIDE_BATCH`` when k > ``WIDE_MMA_K``), else ``None``."""
    B = x.shape[0]
    if not (B <= MMA_BATCH or (B <= MMA_WIDE_BATCH and k > WIDE_MMA_K)) or starts.numel() == 0:
        return None
    from layerprune.sparse import delta_cuda

    if not delta_cuda.usable(x, values, deltas):
        return None
    chunks = delta_cuda.chunks_of(deltas, starts, gptr, n, k)
    return delta_cuda.spmm_tile(x.contiguous(), values, deltas, starts, chunks, n, k)


def decompress(values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor, n: int,
               k: int, cuda: bool | None = None) -> torch.Tensor:
    """The dense (n × k) weight on the device: by default the CUDA unpack kernel (:func:`delta_cuda.unpack`, rows
    built in shared memory, bf16) where it can run, else this module's Triton scatter."""
    if cuda is not False:
        from layerprune.sparse import delta_cuda

        if delta_cuda.usable(values, values, deltas):
            w = delta_cuda.unpack(values, deltas, starts, gptr, n, k)
            if w is not None:
                return w
    w = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    # one row, 16 groups a step, one warp: the best of bench/sparse_delta_decompress.py (62 µs for 4096 × 4096
    # at 70% against 94-105 µs for the other settings; zeroing first beats writing into uninitialised memory)
    _decompress_kernel[(n,)](values, deltas, starts, gptr, w, n, k, R=1, GP=16, **_launch(1, 2))
    return w
