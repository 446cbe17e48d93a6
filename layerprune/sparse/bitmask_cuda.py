"""A CUDA tensor-core kernel for a ``bitmask``-packed weight (:mod:`layerprune.sparse.format`, 16 × 128 tiles): the
weight is decoded straight into ``mma.sync`` A fragments in registers, never stored to shared memory
(``bm_mma_bf16``, :func:`spmm`).

Why: the ``delta`` tile kernel (:mod:`layerprune.sparse.delta_cuda`) writes each decoded entry to a shared-memory
tile at a data-dependent column and reads it back with ``ldmatrix``; Nsight Compute put its limit on those scattered
stores (2.9–3.0-way bank conflicts) and the issue slots of the decode (BENCHMARKS.md, session 19). With a bitmask
every lane knows which positions its fragment holds (m16n8k16: rows g and g + 8, columns 2·tig, 2·tig + 1 and + 8 of
each 16-column slice, g = lane / 4, tig = lane % 4): a position's value sits at the tile's offset + the row's
start (a prefix sum of the rows' popcounts over the warp) + the popcount of the row's bits before it, so a lane
does a popcount and a gather per pair of positions and no store. The idea is SpInfer's (Fan et al., EuroSys 2025:
a bitmap per 8 × 8 tile, decoded to registers); here it reads the format layerprune already writes.

Work: a block of WB warps owns WB row blocks of 16 rows and a split of CPS column tiles of 128; its warps walk the
tiles together. Per tile, x [MT tokens × 128] (shared by the warps) and every warp's bitmask (256 bytes) and values
(the tile's span of ``values``, aligned down to 16 bytes; at most CAP + 8 entries) are copied by ``cp.async`` into
one of NST stages, NST − 1 tiles ahead of the products. With several splits each block writes fp32 partial sums
and the last block of a row group (a counter per group, reset by that block) adds them, as ``delta_tile_bf16``.

Measured on the H200 at 70% (BENCHMARKS.md, session 20): 0.85–1.12× of dense for 1–4 tokens, 0.87–1.05× at 8,
0.76–0.95× at 16, 0.39–0.66× at 64 on 7B/8B/70B shapes. It is flat from 1 to 8 tokens: the decode (64 predicated
two-byte shared loads per tile and lane, about 13 other instructions per pair of positions) is the limit.

Compiled at first use with NVRTC (:mod:`layerprune.sparse.delta_cuda` has the launcher); bf16 only; Ampere or
later.
"""

from __future__ import annotations

import functools
import logging

import torch

from layerprune.sparse import delta_cuda

log = logging.getLogger("layerprune")

DECODE = r"""
// Two positions (bits sh, sh + 1 of word w) as one bf16x2 register: vs points at the word's first value, the first
// position's value sits the popcount of the bits below it further (``below``: the mask of the bits under position sh,
// kept per lane), the second's one more when the first is set.
__device__ __forceinline__ u32 pair(const u16* vs, u32 w, u32 below, int sh) {
    const u16* p = vs + __popc(w & below);
    const u32 t = w >> sh;
    u32 lo = 0u, hi = 0u;
    if (t & 1u) lo = p[0];
    if (t & 2u) hi = p[t & 1u];
    return __byte_perm(lo, hi, 0x5410);
}

// A lane's two rows (g and g + 8) of a 16 × 128 tile staged in shared memory at wb (16 rows' bitmask words, 256
// bytes, then the tile's values from its first entry aligned down to 16 bytes, o0 % 8 entries in): each row's four
// words, and where each word's first value sits. The row starts are prefix sums of the rows' popcounts over the
// eight groups of four lanes (rows g, then g + 8).
struct Rows { const u16* va[4]; const u16* vc[4]; u32 wa[4]; u32 wc[4]; };

__device__ __forceinline__ Rows tile_rows(const unsigned char* wb, int o0, int g) {
    const u16* vs = reinterpret_cast<const u16*>(wb + 256) + (o0 & 7);
    const uint4 ra = reinterpret_cast<const uint4*>(wb)[g];
    const uint4 rc = reinterpret_cast<const uint4*>(wb)[g + 8];
    const int pa0 = __popc(ra.x), pa1 = __popc(ra.y), pa2 = __popc(ra.z), pa3 = __popc(ra.w);
    const int pc0 = __popc(rc.x), pc1 = __popc(rc.y), pc2 = __popc(rc.z), pc3 = __popc(rc.w);
    const int na = pa0 + pa1 + pa2 + pa3, nc = pc0 + pc1 + pc2 + pc3;
    int ia = na, ic = nc;
#pragma unroll
    for (int d = 1; d < 8; d <<= 1) {
        const int ta = __shfl_up_sync(0xffffffffu, ia, 4 * d), tc = __shfl_up_sync(0xffffffffu, ic, 4 * d);
        if (g >= d) { ia += ta; ic += tc; }
    }
    const int top = __shfl_sync(0xffffffffu, ia, 28);
    const int sa = ia - na, sc = top + ic - nc;
    return Rows{{vs + sa, vs + sa + pa0, vs + sa + pa0 + pa1, vs + sa + pa0 + pa1 + pa2},
                {vs + sc, vs + sc + pc0, vs + sc + pc0 + pc1, vs + sc + pc0 + pc1 + pc2},
                {ra.x, ra.y, ra.z, ra.w}, {rc.x, rc.y, rc.z, rc.w}};
}

// Columns 16s … 16s + 15 of the lane's A fragment (m16n8k16): a0 row g, columns 2·tig and + 1; a1 the same of row
// g + 8; a2, a3 the same 8 columns on
__device__ __forceinline__ void slice(const Rows& r, const u32* below, int tig, int s, u32& a0, u32& a1, u32& a2,
                                      u32& a3) {
    const int wi = s >> 1, q = (s & 1) * 2, sh = q * 8 + 2 * tig;
    a0 = pair(r.va[wi], r.wa[wi], below[q], sh);
    a2 = pair(r.va[wi], r.wa[wi], below[q + 1], sh + 8);
    a1 = pair(r.vc[wi], r.wc[wi], below[q], sh);
    a3 = pair(r.vc[wi], r.wc[wi], below[q + 1], sh + 8);
}

// 8 columns (16 bytes) of one token's x from src (column col) to dst: by cp.async when aligned and inside K, else
// element by element with zeros past K
__device__ __forceinline__ void x_chunk(u16* dst, const u16* src, int col, int K, int vec) {
    if (vec && col + 8 <= K) {
        cp16(dst, src);
    } else {
        u32 ev[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) ev[q] = col + q < K ? src[q] : 0u;
        *reinterpret_cast<uint4*>(dst) =
            make_uint4(ev[0] | (ev[1] << 16), ev[2] | (ev[3] << 16), ev[4] | (ev[5] << 16), ev[6] | (ev[7] << 16));
    }
}

// Tile j's first and end offsets (o0, o1) from the warp's window of its tiles' offsets (lane i holds tile win + i's),
// moved on when tile j's end leaves it. Every lane of the warp calls it.
__device__ __forceinline__ void tile_offsets(const int* __restrict__ offs, size_t t0, int j, int cnt, bool live, int lane,
                                             int& win, int& off, int& o0, int& o1) {
    if (j + 1 - win >= 32) {
        win = j;
        off = live && win + lane <= cnt ? offs[t0 + win + lane] : 0;
    }
    o0 = __shfl_sync(0xffffffffu, off, j - win);
    o1 = __shfl_sync(0xffffffffu, off, j + 1 - win);
}

// A warp's copy of one tile into its slot wb: the 16 rows' bitmask words (256 bytes, lanes 0-15) and the values
// [o0, o1) from o0 aligned down to 16 bytes (zeros past the weight's last value)
__device__ __forceinline__ void stage_tile(unsigned char* wb, const u32* __restrict__ bits, const u16* __restrict__ vals,
                                           size_t tile, int o0, int o1, int nnz, int lane) {
    if (lane < 16) cp16(wb + lane * 16, bits + tile * 64 + lane * 4);
    u16* vs = reinterpret_cast<u16*>(wb + 256);
    const int a0 = o0 & ~7, n8 = (o1 - a0 + 7) >> 3;
    for (int i = lane; i < n8; i += 32) {
        const int e = a0 + i * 8;
        if (e + 8 <= nnz) {
            cp16(vs + i * 8, vals + e);
        } else {
            for (int q = 0; q < 8; ++q) vs[i * 8 + q] = e + q < nnz ? vals[e + q] : (u16)0;
        }
    }
}

// A warp's accumulators (acc[4t + h]: row rw + g + 8·(h >> 1), token 8t + 2·tig + (h & 1), MT / 2 of them) into y as
// bf16; with column splits (gridDim.y > 1) into the block's fp32 partial sums, the last block of the row group adding
// them (finish_splits, rows r0 … r0 + rows − 1). Every thread of the block calls it.
__device__ __forceinline__ void store_out(const float* acc, float* part, int* count, u16* y, int N, int nb, int rw,
                                          bool live, int g, int tig, int r0, int rows, int* last_block) {
    float* out = part + (size_t)blockIdx.y * nb * N;
    const bool one = gridDim.y == 1;
#pragma unroll
    for (int t = 0; t < MT / 8; ++t)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const int tk = t * 8 + 2 * tig + (h & 1), rr = rw + g + 8 * (h >> 1);
            if (live && tk < nb && rr < N) {
                if (one) y[(size_t)tk * N + rr] = to_bf(acc[4 * t + h]);
                else out[(size_t)tk * N + rr] = acc[4 * t + h];
            }
        }
    if (!one) finish_splits(part, count, y, N, nb, r0, rows, last_block);
}
"""

SOURCE = delta_cuda.PRELUDE + DECODE + r"""
#define XS 136  // x row stride in shared memory, elements (≡ 4 words mod 32: fragment loads hit 32 banks)
#define VS (CAP + 8)  // a warp's values slot per stage, elements

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_stages() { asm volatile("cp.async.wait_group %0;\n" :: "n"(NST - 2)); }


extern "C" __global__ void __launch_bounds__(32 * WB) bm_mma_bf16(
        const u16* __restrict__ x, const u32* __restrict__ bits, const u16* __restrict__ vals,
        const int* __restrict__ offs, float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int KT, int nb, int sxb, int CPS, int vec, int nnz)
{
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int STAGE = MT * XS * 2 + WB * (256 + VS * 2);
    const int rb = blockIdx.x * WB + warp;
    const bool live = rb * 16 < N;
    const int ca = blockIdx.y * CPS, cb = min(KT, ca + CPS), cnt = cb - ca;
    const size_t t0 = (size_t)rb * KT + ca;  // the warp's first tile
    // x rows past nb stay zero in every stage
    for (int st = 0; st < NST; ++st) {
        u16* xt = reinterpret_cast<u16*>(smem + st * STAGE);
        for (int i = nb * XS + tid; i < MT * XS; i += 32 * WB) xt[i] = 0;
    }
    // offsets of the warp's tiles ca + win + lane (a window of 32, moved when a tile's end leaves it)
    int win = 0;
    int off = live && lane <= cnt ? offs[t0 + lane] : 0;
    __shared__ int o0s[NST][WB];  // per stage and warp: the tile's first value (copied from o0 & ~7)

    auto issue = [&](int j) {
        const int st = j % NST;
        unsigned char* base = smem + st * STAGE;
        u16* xt = reinterpret_cast<u16*>(base);
        const int c0 = (ca + j) * 128;
        for (int idx = tid; idx < nb * 16; idx += 32 * WB) {
            const int t = idx >> 4, c8 = (idx & 15) * 8, col = c0 + c8;
            x_chunk(xt + t * XS + c8, x + (size_t)t * sxb + col, col, K, vec);
        }
        int o0, o1;
        tile_offsets(offs, t0, j, cnt, live, lane, win, off, o0, o1);
        if (lane == 0) o0s[st][warp] = o0;
        if (live) stage_tile(base + MT * XS * 2 + warp * (256 + VS * 2), bits, vals, t0 + j, o0, o1, nnz, lane);
    };

    float acc[MT / 8][4];
#pragma unroll
    for (int t = 0; t < MT / 8; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const u32 below[4] = {(1u << (2 * tig)) - 1u, (1u << (2 * tig + 8)) - 1u, (1u << (2 * tig + 16)) - 1u,
                          (1u << (2 * tig + 24)) - 1u};

#pragma unroll
    for (int j = 0; j < NST - 1; ++j) {
        if (j < cnt) issue(j);
        cp_commit();
    }
    for (int j = 0; j < cnt; ++j) {
        cp_wait_stages();
        __syncthreads();
        if (j + NST - 1 < cnt) issue(j + NST - 1);
        cp_commit();
        const int st = j % NST;
        const unsigned char* base = smem + st * STAGE;
        const u16* xt = reinterpret_cast<const u16*>(base);
        if (!live) continue;
        const Rows rows = tile_rows(base + MT * XS * 2 + warp * (256 + VS * 2), o0s[st][warp], g);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
            u32 a0, a1, a2, a3;
            slice(rows, below, tig, s, a0, a1, a2, a3);
#if MT == 8
            const u32 b0 = *reinterpret_cast<const u32*>(xt + g * XS + s * 16 + 2 * tig);
            const u32 b1 = *reinterpret_cast<const u32*>(xt + g * XS + s * 16 + 2 * tig + 8);
            mma16816(acc[0], a0, a1, a2, a3, b0, b1);
#else
#pragma unroll
            for (int t2 = 0; t2 < MT / 16; ++t2) {
                u32 b00, b01, b10, b11;
                ldsm4(b00, b01, b10, b11, xt + (t2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * XS + s * 16 + ((lane >> 3) & 1) * 8);
                mma16816(acc[2 * t2], a0, a1, a2, a3, b00, b01);
                mma16816(acc[2 * t2 + 1], a0, a1, a2, a3, b10, b11);
            }
#endif
        }
    }
    asm volatile("cp.async.wait_all;\n" ::);
    store_out(&acc[0][0], part, count, y, N, nb, rb * 16, live, g, tig, blockIdx.x * WB * 16, WB * 16, &last_block);
}
"""

MMA_TOKENS = (8, 16, 32, 64)
CAPS = (256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2056)  # a warp's values slot per stage (entries, + 8)
_failed: set[int] = set()


def source(mt: int, wb: int, nst: int, cap: int) -> str:
    if mt not in MMA_TOKENS or nst < 2 or wb < 1 or cap % 8:
        raise ValueError(f"bm_mma_bf16: tokens {mt} not in {MMA_TOKENS}, or stages {nst} < 2, or a bad slot {cap}")
    return f"#define MT {mt}\n#define WB {wb}\n#define NST {nst}\n#define CAP {cap}\n" + SOURCE


@functools.cache
def _kernel(device: int, mt: int, wb: int, nst: int, cap: int):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, wb, nst, cap), "bm_mma_bf16", nvcc_options=["--use_fast_math"])


def kernel(device: int, mt: int, wb: int, nst: int, cap: int):
    """The compiled kernel for these settings (cached per process), or ``None`` when it does not compile here."""
    try:
        return _kernel(device, mt, wb, nst, cap)
    except (RuntimeError, OSError, AttributeError) as e:
        _failed.add(device)
        log.warning("the bitmask CUDA kernel did not compile (%s); using the Triton kernel",
                    str(e).splitlines()[0][:160])
        return None


def max_tile(offsets: torch.Tensor) -> int:
    """The most nonzeros in one tile, computed once per packed weight and kept on its ``offsets`` tensor (a host
    sync the first time; recomputed after an in-place write such as ``load_state_dict``'s)."""
    try:
        key = offsets._version
    except RuntimeError:
        key = 0
    held = getattr(offsets, "_layerprune_max_tile", None)
    if held is None or held[0] != key:
        m = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        held = offsets._layerprune_max_tile = (key, m)
    return held[1]


def cap_for(most: int) -> int:
    """The smallest values slot that holds a tile of ``most`` nonzeros from any start (aligned down by ≤ 7)."""
    return next(c for c in CAPS if c >= most)


def stage_bytes(mt: int, wb: int, cap: int) -> int:
    return mt * 136 * 2 + wb * (256 + (cap + 8) * 2)


def usable(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, bn: int, bk: int) -> bool:
    return (x.is_cuda and x.dtype == torch.bfloat16 and values.dtype == torch.bfloat16 and torch.version.hip is None
            and (bn, bk) == (16, 128) and hasattr(torch.cuda, "_compile_kernel") and x.device.index not in _failed
            and values.data_ptr() % 16 == 0 and bitmask.data_ptr() % 16 == 0
            and delta_cuda.capability(x.device.index) >= (8, 0))


def wanted(b: int, n: int, k: int, nnz: int) -> bool:
    """Whether the op sends ``b`` tokens of an n × k weight with ``nnz`` nonzeros here: 2–64 tokens; one token too,
    except on weights of more than 16384 rows at 65% sparsity or more, where the Triton set-bit kernel was faster
    (28672 × 8192 at 70%: 124 against 146 µs here; at 50% 228 against 173; on every other 7B/8B/70B shape this kernel
    was the faster by 2–45%: bench/results/sparse_bitmask_mma_sweep_h200.json)."""
    return 1 <= b <= 64 and (b > 1 or n <= 16384 or nnz > 0.35 * n * k)


def settings(n: int, k: int, b: int) -> tuple[int, int, float]:
    """(warps per block, stages, blocks per SM the column splits aim at) for ``b`` tokens of an n × k weight, from
    bench/sparse_bitmask_mma.py's sweeps on the H200 (session 20): 2 stages; up to 16 tokens 4 warps up to 50 M
    weights (else 8) and 4 blocks per SM (2 below 8 M weights); past 16 tokens 8 warps (4 below 8 M) and 2 blocks per
    SM. Within 2% of each row's best of warps × blocks per SM on 8 shapes at 8–64 tokens (geometric mean 0.999)."""
    small = n * k < 8_000_000
    if b <= 16:
        return (4 if n * k <= 50_000_000 else 8), 2, (2.0 if small else 4.0)
    return (4 if small else 8), 2, 2.0


def slot_for(offsets: torch.Tensor, most: int | None) -> int:
    """The values slot (:func:`cap_for`) for a tile of ``most`` nonzeros; ``None``: the weight's :func:`max_tile`, or
    a full tile inside a CUDA-graph capture that has not seen the weight (no host sync there)."""
    if most is None:
        known = getattr(offsets, "_layerprune_max_tile", None) is not None
        most = max_tile(offsets) if known or not torch.cuda.is_current_stream_capturing() else 16 * 128
    return cap_for(most + 7)


def split_plan(x: torch.Tensor, kt: int, groups: int, splits: int, mt: int, n: int):
    """(tiles a split, splits, the counters, the fp32 partial sums or the counters when there is one split) for
    ``groups`` row groups over ``kt`` column tiles in ``splits`` splits; ``None`` when the counters are too few."""
    cps = -(-kt // splits)
    s = -(-kt // cps)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    count = delta_cuda._counters(dev, delta_cuda.cur_stream(x.device.index))
    if s > 1 and groups > count.numel():
        return None
    return cps, s, count, (torch.empty(s, mt, n, dtype=torch.float32, device=x.device) if s > 1 else count)


def spmm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int,
         most: int | None = None, warps: int | None = None, stages: int | None = None, splits: int | None = None,
         blocks_per_sm: float | None = None) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 with W bitmask-packed (16 × 128 tiles), on tensor cores, up to 64 tokens a
    pass (more in several); ``None`` when the kernel cannot run (the caller falls back). ``most``: the most
    nonzeros of a tile (default :func:`max_tile`; inside a CUDA-graph capture that has not seen the weight, a
    full tile, so that no host sync is needed). Settings default to :func:`settings`."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    sms, limit = delta_cuda._props(dev)
    B = x.shape[0]
    mt = next((t for t in MMA_TOKENS if t >= B), MMA_TOKENS[-1])
    w0, s0, b0 = settings(n, k, B)
    warps, stages, blocks_per_sm = warps or w0, stages or s0, blocks_per_sm or b0
    cap = slot_for(offsets, most)
    smem = stages * stage_bytes(mt, warps, cap)
    if smem + 64 > limit:
        return None
    kern = kernel(dev, mt, warps, stages, cap)
    if kern is None:
        return None
    x, y, done = delta_cuda.io(x, n, k)
    if done:
        return y
    kt = -(-k // 128)
    groups = -(-(-(-n // 16)) // warps)
    if splits is None:
        splits = max(1, min(kt, round(blocks_per_sm * sms / groups)))
    plan = split_plan(x, kt, groups, splits, mt, n)
    if plan is None:
        return None
    cps, s, count, part = plan
    stream = delta_cuda.cur_stream(x.device.index)
    nnz = values.numel()
    for p in range(0, B, mt):
        xp = x[p:]
        vec = int(xp.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
        delta_cuda._launch(kern, (groups, s), 32 * warps, smem, stream,
                           (xp, bitmask, values, offsets, part, count, y[p:]),
                           (n, k, kt, min(mt, B - p), x.stride(0), cps, vec, nnz))
    return y
