"""CUDA kernels for a ``delta``-packed weight (:mod:`layerprune.sparse.delta`): the product with 1–16 tokens
gathering x (``delta_spmv_bf16``), the product on tensor cores with the weight decoded tile by tile in shared
memory (``delta_tile_bf16``, :func:`spmm_tile`: the op's choice for 9–32 tokens, and up to 64 on K > 12288; at 70%
0.64–0.79× of dense at 16 tokens, BENCHMARKS.md session 16) and the dense weight (``delta_unpack_bf16``, for
batches and prefills past that).

Why CUDA next to the Triton kernels: those gather x from global memory (L1 hits), and Nsight Compute put
their main stall on the L1TEX scoreboard (BENCHMARKS.md). Here a block first copies x into shared memory
(2·K bytes, plus 64 zeros for the padding entries' columns) and every gather is a shared-memory load. Triton
cannot keep a tensor in shared memory across loop steps and index it (``tl.gather`` stores its source again
on every call: its PTX has K/128 stores per thread and a barrier in the loop).

Work: a warp owns a row at a time, four lanes per group of 32 entries, eight groups per warp step. A lane
takes one quarter (8 entries): one 16-byte load of its values, one 8-byte load of the delta word holding its
nibbles (low nibbles for quarters 0–1, high for 2–3), the group's start. Its 8 columns are the start + the
carry of the quarters before it + a SWAR prefix sum (nibbles + 1 spread one per byte, times 0x0101…01); the
carry comes from a two-step shuffle scan over the group's four lanes. ``U`` steps' loads are issued before
any is used. The row's fp32 sum is reduced with warp shuffles and written as bf16 (round to nearest even).
The loads are software-pipelined: a warp's first row pointers and first step are requested before the
block waits for x, each next step (or the next row's first step) before the current one is computed.
Measured against the Triton kernels, the first CUDA design (2 or 4 entries per lane, all four quarters'
prefix sums on every lane: slower than Triton), this one without the pipelining (3–13% slower) and with 2
or 4 warps sharing a row (no faster: ``sparse_delta_cuda_split_h200.json``) in BENCHMARKS.md, "Sparse
inference".

Several tokens (``T`` = 2, 4, 8, 16 per pass): shared memory holds a column's T tokens side by side, so an entry
does one 4–32-byte load and T FMAs; B tokens go T at a time (:func:`tokens_per_pass`). Bank conflicts: column c
sits at slot c + (c >> 4)·skw, because on a regular mask (2:4) the eight groups of a step gather from columns 64
apart, one bank without the skew (2:4 one token 0.88–1.08× → 1.21–1.55× of dense, BENCHMARKS.md session 15).
The unpack kernel builds a row in shared memory and writes it with 16-byte stores (3–7× faster than the Triton
scatter; bit-exact).

Compiled at first use with NVRTC through ``torch.cuda._compile_kernel`` (PyTorch ≥ 2.8; NVRTC ships with
PyTorch's CUDA wheels; PyTorch's helper also wants a CUDA toolkit's headers, ``CUDA_HOME``), so nothing is
built at install time. bf16 only. :func:`usable` says whether it can run here; :func:`delta_kernels.sparse_mm`
falls back to its Triton kernel otherwise (and when compiling fails, with one warning).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct

import torch

log = logging.getLogger("layerprune")

PRELUDE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf(u32 h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ u16 to_bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800  // bf16 mma.sync: Ampere and later (spmm_tile checks the device; older ones still compile the rest)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Four 8 × 8 bf16 matrices from shared memory in mma fragment order (lane l gives the address of row l % 8 of
// matrix l / 8).
__device__ __forceinline__ void ldsm4(u32& r0, u32& r1, u32& r2, u32& r3, const u16* p) {
#if __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
#endif
}

__device__ __forceinline__ void cp16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(d), "l"(src));
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void cp_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// x[t][c0 … c0 + kc − 1] for tokens t < mt into shared memory (row stride xs_stride elements; kc a multiple of 8),
// by cp.async where 16 bytes are whole and aligned (``vec``), else element by element; tokens past nb and columns past
// K as zeros. Every thread of the block calls it (tid of nthreads); the caller waits (cp_wait) and syncs.
__device__ __forceinline__ void stage_x(u16* xt, const u16* __restrict__ x, int sxb, int nb, int K, int c0, int kc,
                                        int mt, int xs_stride, int vec, int tid, int nthreads) {
    for (int idx = tid; idx < mt * (kc >> 3); idx += nthreads) {
        const int t = idx / (kc >> 3), c8 = (idx % (kc >> 3)) << 3, col = c0 + c8;
        u16* dst = xt + t * xs_stride + c8;
        const u16* src = x + (size_t)t * sxb + col;
        if (t < nb && vec && col + 8 <= K) {
            cp16(dst, src);
        } else {
            u32 ev[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) ev[j] = t < nb && col + j < K ? src[j] : 0u;
            *reinterpret_cast<uint4*>(dst) =
                make_uint4(ev[0] | (ev[1] << 16), ev[2] | (ev[3] << 16), ev[4] | (ev[5] << 16), ev[6] | (ev[7] << 16));
        }
    }
}

// The second half of a split reduction over gridDim.y column splits: after each block wrote its fp32 partial sums
// (part[split][token][row]), the last block of row group blockIdx.x to finish (a counter per group, reset by that
// block for the next launch) adds them for rows r0 … r0 + rows − 1 and writes y as bf16. Every thread calls it.
__device__ __forceinline__ void finish_splits(const float* part, int* count, u16* y, int N, int nb, int r0, int rows,
                                              int* last_block) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *last_block = atomicAdd(count + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!*last_block) return;
    __threadfence();
    const int S = gridDim.y;
    if (((rows | r0 | N) & 3) == 0) {
        // four rows a thread (16-byte loads, 8-byte stores), the splits added four at a time: many loads in flight, so
        // that this block's pass (at 64 tokens 32 serial rounds of L2 reads before) is no longer the launch's tail
        const int q = rows >> 2;
        for (int idx = threadIdx.x; idx < nb * q; idx += blockDim.x) {
            const int tk = idx / q, rr = r0 + (idx % q) * 4;
            if (rr >= N) continue;
            const float* p = part + (size_t)tk * N + rr;
            const size_t step = (size_t)nb * N;
            float4 s0 = make_float4(0.f, 0.f, 0.f, 0.f), s1 = s0;
            int sp = 0;
            for (; sp + 4 <= S; sp += 4) {
                const float4 a = __ldcg(reinterpret_cast<const float4*>(p + sp * step));
                const float4 b = __ldcg(reinterpret_cast<const float4*>(p + (sp + 1) * step));
                const float4 c = __ldcg(reinterpret_cast<const float4*>(p + (sp + 2) * step));
                const float4 d = __ldcg(reinterpret_cast<const float4*>(p + (sp + 3) * step));
                s0.x += a.x + c.x; s0.y += a.y + c.y; s0.z += a.z + c.z; s0.w += a.w + c.w;
                s1.x += b.x + d.x; s1.y += b.y + d.y; s1.z += b.z + d.z; s1.w += b.w + d.w;
            }
            for (; sp < S; ++sp) {
                const float4 a = __ldcg(reinterpret_cast<const float4*>(p + sp * step));
                s0.x += a.x; s0.y += a.y; s0.z += a.z; s0.w += a.w;
            }
            const u32 lo = (u32)to_bf(s0.x + s1.x) | ((u32)to_bf(s0.y + s1.y) << 16);
            const u32 hi = (u32)to_bf(s0.z + s1.z) | ((u32)to_bf(s0.w + s1.w) << 16);
            *reinterpret_cast<uint2*>(y + (size_t)tk * N + rr) = make_uint2(lo, hi);
        }
    } else {
        for (int idx = threadIdx.x; idx < nb * rows; idx += blockDim.x) {
            const int tk = idx / rows, rr = r0 + idx % rows;
            if (rr >= N) continue;
            float sum = 0.f;
            for (int sp = 0; sp < S; ++sp) sum += __ldcg(part + ((size_t)sp * nb + tk) * N + rr);
            y[(size_t)tk * N + rr] = to_bf(sum);
        }
    }
    if (threadIdx.x == 0) count[blockIdx.x] = 0;  // ready for the next launch
}

"""

SOURCE = PRELUDE + r"""
// PAD (zero columns past K in shared memory: padding entries' columns run past the row by < 32) and U (steps
// in flight) come from source()

// Software-pipelined: a warp's first row pointers and first step's loads are issued before the block waits
// for x, the next step's (or the next row's first step's) loads before the current step is computed, and
// the next row's pointers when a row starts.
__device__ __forceinline__ void load_step(uint4* v, u64* w, u32* s, const u16* __restrict__ vals,
                                          const u64* __restrict__ dl, const u16* __restrict__ starts,
                                          int gb, int g0, int g1, int sub, int part) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int g = gb + u * 8 + sub;
        const int gc = g < g1 ? g : g0;
        v[u] = __ldcs(reinterpret_cast<const uint4*>(vals) + (size_t)gc * 4 + part);
        w[u] = __ldcs(dl + (size_t)gc * 2 + (part & 1));
        s[u] = starts[gc];
    }
}

// A lane's quarter of a group (8 entries): p holds, byte j, entry j's column past ``base`` (SWAR prefix sum of the
// nibbles + 1); base is the group's start − 1 plus the columns of the quarters before it (two-step shuffle scan
// over the group's four lanes). Every lane of the warp must call it (the shuffles).
__device__ __forceinline__ int quarter(u64 w, u32 s, int part, u64& p) {
    const u64 LO = 0x0F0F0F0F0F0F0F0FULL, ONE = 0x0101010101010101ULL;
    p = (((w >> (4 * (part >> 1))) & LO) + ONE) * ONE;
    const int tot = (int)(p >> 56);
    int c = __shfl_up_sync(0xffffffffu, tot, 1, 4);
    c = part >= 1 ? c : 0;
    const int c2 = __shfl_up_sync(0xffffffffu, c + tot, 2, 4);
    c += part >= 2 ? c2 : 0;
    return (int)(s & 0xFFFFu) - 1 + c;
}

// Column c of x sits at shared-memory slot c + (c >> 4)·skw: without the skew, the columns that the 32 lanes
// of a step gather on a regular mask (2:4: each group spans 64 columns, a lane's quarter 16) fall into a few
// banks; with it, one slot per 16 columns (two for one token, whose columns share 4-byte words) spreads them.
__device__ __forceinline__ int slot(int c, int skw) { return c + (c >> 4) * skw; }

// acc[t] += the step's products with token t's x (xs: a column's T values side by side)
__device__ __forceinline__ void step_dot(float* acc, const uint4* v, const u64* w, const u32* s, const u16* xs,
                                         int gb, int g1, int sub, int part, int skw) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        u64 p;
        const int base = quarter(w[u], s[u], part, p);
        const u32 vv[8] = {v[u].x & 0xFFFFu, v[u].x >> 16, v[u].y & 0xFFFFu, v[u].y >> 16,
                           v[u].z & 0xFFFFu, v[u].z >> 16, v[u].w & 0xFFFFu, v[u].w >> 16};
        float a[T];
#pragma unroll
        for (int t = 0; t < T; ++t) a[t] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = slot(base + (int)((p >> (8 * j)) & 0xFF), skw);
            const float wv = bf(vv[j]);
#if T == 1
            a[0] += wv * bf(xs[col]);
#else
            u32 xw[T / 2];
#if T == 2
            xw[0] = *reinterpret_cast<const u32*>(xs + col * 2);
#elif T == 4
            { const uint2 q = *reinterpret_cast<const uint2*>(xs + col * 4); xw[0] = q.x; xw[1] = q.y; }
#else
#pragma unroll
            for (int h = 0; h < T / 8; ++h) {
                const uint4 q = reinterpret_cast<const uint4*>(xs + col * T)[h];
                xw[4 * h] = q.x; xw[4 * h + 1] = q.y; xw[4 * h + 2] = q.z; xw[4 * h + 3] = q.w;
            }
#endif
#pragma unroll
            for (int i = 0; i < T / 2; ++i) {
                a[2 * i] += wv * __uint_as_float(xw[i] << 16);
                a[2 * i + 1] += wv * __uint_as_float(xw[i] & 0xFFFF0000u);
            }
#endif
        }
        const bool ok = gb + u * 8 + sub < g1;
#pragma unroll
        for (int t = 0; t < T; ++t) acc[t] += ok ? a[t] : 0.f;
    }
}

// y[t·N + r] = Σ W[r, :] · x[t·sxb + :] for the nb ≤ T tokens of one pass
extern "C" __global__ void delta_spmv_bf16(const u16* __restrict__ x, const u16* __restrict__ vals,
                                           const u64* __restrict__ dl, const u16* __restrict__ starts,
                                           const int* __restrict__ gptr, u16* __restrict__ y,
                                           int N, int K, int vec, int sxb, int nb, int skw)
{
    extern __shared__ __align__(16) u16 xs[];
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, sub = lane >> 2, part = lane & 3;
    const int nwarps = gridDim.x * (nt >> 5);
    int r = blockIdx.x * (nt >> 5) + (tid >> 5);
    int g0 = 0, g1 = 0, n0 = 0, n1 = 0;
    if (r < N) { g0 = gptr[r]; g1 = gptr[r + 1]; }
    int rn = r + nwarps;
    if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
    uint4 v[U], v2[U];
    u64 w[U], w2[U];
    u32 s[U], s2[U];
    int gb = g0;
    if (gb < g1) load_step(v, w, s, vals, dl, starts, gb, g0, g1, sub, part);
#if T == 1
    if (vec) {  // 8 columns (one 16-byte load) stay together in shared memory: 8 | c, so no skew slot among them
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (int i = tid; i < (K >> 3); i += nt) {
            const uint4 q = x4[i];
            u32* d = reinterpret_cast<u32*>(xs + slot(8 * i, skw));
            d[0] = q.x; d[1] = q.y; d[2] = q.z; d[3] = q.w;
        }
        for (int i = (K & ~7) + tid; i < K; i += nt) xs[slot(i, skw)] = x[i];
    } else {
        for (int i = tid; i < K; i += nt) xs[slot(i, skw)] = x[i];
    }
    for (int i = K + tid; i < K + PAD; i += nt) xs[slot(i, skw)] = 0;
#else
    // a column's T values side by side (tokens past nb and columns past K are zeros)
    for (int i = tid; i < K + PAD; i += nt) {
        u32 xw[T / 2];
#pragma unroll
        for (int h = 0; h < T / 2; ++h) {
            const u32 lo = (i < K && 2 * h < nb) ? x[(size_t)(2 * h) * sxb + i] : 0u;
            const u32 hi = (i < K && 2 * h + 1 < nb) ? x[(size_t)(2 * h + 1) * sxb + i] : 0u;
            xw[h] = lo | (hi << 16);
        }
        const int c = slot(i, skw);
#if T == 2
        reinterpret_cast<u32*>(xs)[c] = xw[0];
#elif T == 4
        reinterpret_cast<uint2*>(xs)[c] = make_uint2(xw[0], xw[1]);
#else
#pragma unroll
        for (int h = 0; h < T / 8; ++h)
            reinterpret_cast<uint4*>(xs + (size_t)c * T)[h] = make_uint4(xw[4 * h], xw[4 * h + 1], xw[4 * h + 2], xw[4 * h + 3]);
#endif
    }
#endif
    __syncthreads();
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.f;
    while (r < N) {
        int gn = gb + 8 * U;
        const bool same = gn < g1;
        if (same) load_step(v2, w2, s2, vals, dl, starts, gn, g0, g1, sub, part);
        else if (rn < N && n0 < n1) load_step(v2, w2, s2, vals, dl, starts, n0, n0, n1, sub, part);
        if (gb < g1) step_dot(acc, v, w, s, xs, gb, g1, sub, part, skw);
        if (!same) {
            float o = 0.f;
#pragma unroll
            for (int t = 0; t < T; ++t) {
#pragma unroll
                for (int m = 16; m; m >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], m);
                o = lane == t ? acc[t] : o;
                acc[t] = 0.f;
            }
            if (lane < nb) y[(size_t)lane * N + r] = to_bf(o);
            r = rn; g0 = n0; g1 = n1; gn = n0;
            rn = r + nwarps;
            if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
        }
        gb = gn;
#pragma unroll
        for (int u = 0; u < U; ++u) { v[u] = v2[u]; w[u] = w2[u]; s[u] = s2[u]; }
    }
}

// The dense weight, a row at a time: a warp zeroes its row buffer in shared memory (RS ≥ K + PAD columns),
// stores each entry's value at its column (fillers and padding store zeros: columns within a row are
// distinct), then writes the row out with 16-byte stores. Loads pipelined one step ahead within a row.
__device__ __forceinline__ void step_scatter(u16* ws, const uint4* v, const u64* w, const u32* s,
                                             int gb, int g1, int sub, int part) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        u64 p;
        const int base = quarter(w[u], s[u], part, p);
        if (gb + u * 8 + sub < g1) {
            const u32 vv[8] = {v[u].x & 0xFFFFu, v[u].x >> 16, v[u].y & 0xFFFFu, v[u].y >> 16,
                               v[u].z & 0xFFFFu, v[u].z >> 16, v[u].w & 0xFFFFu, v[u].w >> 16};
#pragma unroll
            for (int j = 0; j < 8; ++j) ws[base + (int)((p >> (8 * j)) & 0xFF)] = (u16)vv[j];
        }
    }
}

extern "C" __global__ void delta_unpack_bf16(const u16* __restrict__ vals, const u64* __restrict__ dl,
                                             const u16* __restrict__ starts, const int* __restrict__ gptr,
                                             u16* __restrict__ out, int N, int K, int RS, int vec)
{
    extern __shared__ __align__(16) u16 xs[];
    const int tid = threadIdx.x, lane = tid & 31, sub = lane >> 2, part = lane & 3;
    u16* ws = xs + (size_t)(tid >> 5) * RS;
    uint4* w4 = reinterpret_cast<uint4*>(ws);
    const int nwarps = gridDim.x * (blockDim.x >> 5);
    uint4 v[U], v2[U];
    u64 w[U], w2[U];
    u32 s[U], s2[U];
    for (int r = blockIdx.x * (blockDim.x >> 5) + (tid >> 5); r < N; r += nwarps) {
        const int g0 = gptr[r], g1 = gptr[r + 1];
        if (g0 < g1) load_step(v, w, s, vals, dl, starts, g0, g0, g1, sub, part);
        for (int i = lane; i < (RS >> 3); i += 32) w4[i] = make_uint4(0u, 0u, 0u, 0u);
        __syncwarp();
        for (int gb = g0; gb < g1; gb += 8 * U) {
            const int gn = gb + 8 * U;
            if (gn < g1) load_step(v2, w2, s2, vals, dl, starts, gn, g0, g1, sub, part);
            step_scatter(ws, v, w, s, gb, g1, sub, part);
#pragma unroll
            for (int u = 0; u < U; ++u) { v[u] = v2[u]; w[u] = w2[u]; s[u] = s2[u]; }
        }
        __syncwarp();
        u16* o = out + (size_t)r * K;
        if (vec) {
            for (int i = lane; i < (K >> 3); i += 32) reinterpret_cast<uint4*>(o)[i] = w4[i];
            for (int i = (K & ~7) + lane; i < K; i += 32) o[i] = ws[i];
        } else {
            for (int i = lane; i < K; i += 32) o[i] = ws[i];
        }
        __syncwarp();
    }
}

// ---- Tensor cores for 9–64 tokens (``delta_tile_bf16``): the weight decoded into shared memory tile by tile, never
// written to global memory. A block of WB warps owns RW·WB rows (RW = 16·MW: MW m16 tiles a warp) and a split of CPS
// chunks of KC columns. Row r's groups that reach into chunk c are cidx[r][c] … min(cidx[r][c+1] + 1,
// cidx[r][NCH]) − 1 (:func:`chunk_index`), so there is no search and no walk. Per chunk: x[MT tokens × KC]
// arrives by cp.async; each warp zeroes its W tile [RW × KC], lists its rows' groups for the chunk (a prefix sum
// over its lanes), and stores their entries eight groups at a time (four lanes a group, ``quarter``; U steps'
// loads in flight; the next chunk's first step requested before the products); then mma.sync m16n8k16 (bf16,
// fp32 accumulation). One split writes y; with several, each block writes fp32 partial sums and the last block of
// a row tile to finish (a counter per tile, reset by that block) adds them and writes y.
#define XS (KC + 8)  // row stride of both tiles, in elements (≡ 4 words mod 32: fragment loads hit 32 banks)
#define RW (16 * MW)

// The warp's list for a chunk: the row of lane i (< RW) brings n groups from a; returns the list's length.
__device__ __forceinline__ int make_list(int n, int a, int lane, int* pre, int* first, unsigned char* rows) {
    int inc = n;
#pragma unroll
    for (int o = 1; o < RW; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, inc, o);
        inc += lane >= o ? t : 0;
    }
    const int total = __shfl_sync(0xffffffffu, inc, RW - 1);
    __syncwarp();
    if (lane < RW) {
        pre[lane] = inc - n;
        first[lane] = a;
        for (int j = inc - n; j < inc; ++j) rows[j] = (unsigned char)lane;
    }
    __syncwarp();
    return total;
}

// Requests list positions b + 8u + sub (clamped to the list; total ≥ 1): the row (from the warp's table of list
// positions' rows; a binary search over pre measured 1–3% slower) goes to the top bits of s.
__device__ __forceinline__ void load_items(uint4* v, u64* w, u32* s, const u16* __restrict__ vals,
                                           const u64* __restrict__ dl, const u16* __restrict__ starts,
                                           const int* pre, const int* first, const unsigned char* rows, int b,
                                           int total, int sub, int q) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int it = min(b + u * 8 + sub, total - 1);
        const int i = rows[it];
        const int g = first[i] + it - pre[i];
        v[u] = __ldcs(reinterpret_cast<const uint4*>(vals) + (size_t)g * 4 + q);
        w[u] = __ldcs(dl + (size_t)g * 2 + (q & 1));
        s[u] = (u32)starts[g] | ((u32)i << 16);
    }
}

__device__ __forceinline__ void store_items(u16* wt, const uint4* v, const u64* w, const u32* s, int b, int total,
                                            int sub, int q, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        u64 p;
        const int base = quarter(w[u], s[u], q, p) - c0;
        if (b + u * 8 + sub < total) {
            const u32 vv[8] = {v[u].x & 0xFFFFu, v[u].x >> 16, v[u].y & 0xFFFFu, v[u].y >> 16,
                               v[u].z & 0xFFFFu, v[u].z >> 16, v[u].w & 0xFFFFu, v[u].w >> 16};
            u16* wr = wt + (s[u] >> 16) * XS;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int col = base + (int)((p >> (8 * j)) & 0xFF);
                if ((unsigned)col < (unsigned)KC) wr[col] = (u16)vv[j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * WB) delta_tile_bf16(
        const u16* __restrict__ x, const u16* __restrict__ vals, const u64* __restrict__ dl,
        const u16* __restrict__ starts, const int* __restrict__ cidx, float* __restrict__ part,
        int* __restrict__ count, u16* __restrict__ y, int N, int K, int nb, int sxb, int CPS, int NCH, int vec)
{
    extern __shared__ __align__(16) u16 sm[];
    __shared__ int pre[WB][RW], first[WB][RW];
    __shared__ unsigned char rows[WB][RW * ((KC + 31) / 32 + 2)];  // a list position's row: a group spans ≥ 32
                                                                   // columns, so ≤ ⌈KC/32⌉ + 2 are listed per row
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, sub = lane >> 2, q = lane & 3;
    u16* xt = sm;                                  // MT × XS
    u16* wt = sm + MT * XS + warp * RW * XS;       // this warp's RW × XS
    const int rw = (blockIdx.x * WB + warp) * RW;
    const int ca = blockIdx.y * CPS, cb = min(NCH, ca + CPS);
    // lane i < RW: row rw + i's groups for the current chunk are [a, min(b + 1, e)); bn = the next chunk's b
    const bool live = lane < RW && rw + lane < N;
    const int* ci = cidx + (size_t)(rw + lane) * (NCH + 1);
    int a = 0, b = 0, e = 0;
    if (live) { a = ci[ca]; b = ci[ca + 1]; e = ci[NCH]; }
    uint4 v[U];
    u64 w[U];
    u32 s[U];
    int total = make_list(live ? min(b + 1, e) - a : 0, a, lane, pre[warp], first[warp], rows[warp]);
    if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);
    float acc[MW][MT / 8][4];
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int t = 0; t < MT / 8; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.f;
    const int fg = lane >> 2, ft = lane & 3;
    for (int c = ca; c < cb; ++c) {
        const int c0 = c * KC;
        int bn = 0;
        if (live && c + 2 <= NCH) bn = ci[c + 2];
        stage_x(xt, x, sxb, nb, K, c0, KC, MT, XS, vec, tid, 32 * WB);
        for (int idx = lane; idx < RW * (KC / 8); idx += 32)
            *reinterpret_cast<uint4*>(wt + (idx / (KC / 8)) * XS + (idx % (KC / 8)) * 8) = make_uint4(0u, 0u, 0u, 0u);
        __syncwarp();
        for (int bb = 0; bb < total; bb += 8 * U) {  // the first step's loads were requested before
            if (bb) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], bb, total, sub, q);
            store_items(wt, v, w, s, bb, total, sub, q, c0);
        }
        if (c + 1 < cb) {  // the next chunk's list, and its first step's loads in flight during the products
            a = b;
            b = bn;
            total = make_list(live ? min(b + 1, e) - a : 0, a, lane, pre[warp], first[warp], rows[warp]);
            if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);
        }
        cp_wait();
        __syncthreads();
#pragma unroll 2
        for (int kk = 0; kk < KC; kk += 16) {
            u32 bf[MT / 8][2];  // x: two n8 tiles (16 tokens) × k16 per ldmatrix
#pragma unroll
            for (int t2 = 0; t2 < MT / 16; ++t2)
                ldsm4(bf[2 * t2][0], bf[2 * t2][1], bf[2 * t2 + 1][0], bf[2 * t2 + 1][1],
                      xt + (t2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * XS + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int m = 0; m < MW; ++m) {
                u32 a0, a1, a2, a3;  // W: rows 0–7 / 8–15 × k 0–7 / 8–15
                ldsm4(a0, a1, a2, a3, wt + (m * 16 + (lane & 15)) * XS + kk + (lane >> 4) * 8);
#pragma unroll
                for (int t = 0; t < MT / 8; ++t) mma16816(acc[m][t], a0, a1, a2, a3, bf[t][0], bf[t][1]);
            }
        }
        __syncthreads();
    }
    float* out = part + (size_t)blockIdx.y * nb * N;
    const bool one = gridDim.y == 1;
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int t = 0; t < MT / 8; ++t)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int tk = t * 8 + 2 * ft + (h & 1), rr = rw + m * 16 + fg + 8 * (h >> 1);
                if (tk < nb && rr < N) {
                    if (one) y[(size_t)tk * N + rr] = to_bf(acc[m][t][h]);
                    else out[(size_t)tk * N + rr] = acc[m][t][h];
                }
            }
    if (!one) finish_splits(part, count, y, N, nb, blockIdx.x * WB * RW, WB * RW, &last_block);
}
"""

PAD = 64
TOKENS = (1, 2, 4, 8, 16)  # tokens per pass the gather kernel is built for
MMA_TOKENS = (16, 32, 64)  # and the tensor-core kernel
TILE = (8, 1, 256)  # the tensor-core kernel's warps per block, m16 tiles per warp, chunk of columns (WB, MW, KC)
_failed: set[int] = set()


def source(unroll: int, tokens: int = 1, mma_tokens: int = 16, tile: tuple[int, int, int] = TILE) -> str:
    """The kernels' CUDA source for ``unroll`` steps in flight and ``tokens`` tokens per pass (the gather kernel),
    ``mma_tokens`` per pass and ``tile`` = (warps per block, m16 tiles per warp, chunk) for the tensor-core kernel."""
    if tokens not in TOKENS or mma_tokens not in MMA_TOKENS:
        raise ValueError(f"tokens per pass must be one of {TOKENS} (gather) or {MMA_TOKENS} (tensor cores)")
    wb, mw, kc = tile
    if mw not in (1, 2) or kc % 16 or wb < 1:
        raise ValueError(f"tile {tile}: 1 or 2 m16 tiles per warp, a chunk that is a multiple of 16")
    return (f"#define U {unroll}\n#define T {tokens}\n#define MT {mma_tokens}\n#define PAD {PAD}\n"
            f"#define WB {wb}\n#define MW {mw}\n#define KC {kc}\n" + SOURCE)


def usable(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor) -> bool:
    """Whether the kernel can take this call: a CUDA device whose kernel compiled (or can be tried), bf16, and
    buffers aligned for its vector loads (16 bytes; packed and loaded tensors are)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and values.dtype == torch.bfloat16 and torch.version.hip is None
            and hasattr(torch.cuda, "_compile_kernel") and x.device.index not in _failed
            and values.data_ptr() % 16 == 0 and deltas.data_ptr() % 16 == 0)


@functools.cache
def _kernel(device: int, unroll: int, tokens: int, name: str, mma_tokens: int = 16, tile: tuple = TILE):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(unroll, tokens, mma_tokens, tile), name,
                                          nvcc_options=["--use_fast_math"])


def kernel(device: int, unroll: int, tokens: int = 1, name: str = "delta_spmv_bf16", mma_tokens: int = 16,
           tile: tuple[int, int, int] = TILE):
    """The compiled kernel ``name`` (the product, ``delta_unpack_bf16`` or ``delta_tile_bf16``) for ``unroll``
    steps in flight and ``tokens`` (``mma_tokens``) per pass on CUDA device ``device`` (cached per process), or
    ``None`` when it cannot be compiled here (one warning; the caller uses Triton)."""
    try:
        return _kernel(device, unroll, tokens, name, mma_tokens, tuple(tile))
    except (RuntimeError, OSError, AttributeError) as e:
        _failed.add(device)
        log.warning("the CUDA kernel did not compile (%s); using the Triton kernel",
                    str(e).splitlines()[0][:160])
        return None


def skew(tokens: int) -> int:
    """Skew slots per 16 columns of x in shared memory (see the source's ``slot``): one 4-byte word."""
    return 2 if tokens == 1 else 1


def smem_bytes(k: int, tokens: int, skw: int | None = None) -> int:
    """Shared memory of a block: x's K columns plus PAD zero columns and the skew slots, ``tokens`` bf16 values
    each."""
    skw = skew(tokens) if skw is None else skw
    return 2 * tokens * (k + PAD + ((k + PAD) // 16 + 1) * skw)


def tokens_per_pass(b: int, k: int, limit: int) -> int:
    """The smallest pass width in ``TOKENS`` that holds ``b`` tokens and whose x fits in ``limit`` bytes of
    shared memory (skewed, or else unskewed), else the widest that fits (then several passes); 0 when not even
    one token's x fits (the caller falls back)."""
    fit = [t for t in TOKENS if smem_bytes(k, t, 0) <= limit]
    return next((t for t in fit if t >= b), fit[-1] if fit else 0)


def unskewed(b: int, k: int, limit: int) -> bool:
    """Whether :func:`spmv` runs ``b`` tokens with ``k`` inputs without the skew slots: its pass width's skewed x
    does not fit in ``limit`` bytes (4 tokens at k = 28672, 8 at k = 14336 on the H200's 227 KB)."""
    t = tokens_per_pass(b, k, limit)
    return t > 0 and smem_bytes(k, t) > limit


def regular(starts: torch.Tensor, gptr: torch.Tensor) -> bool:
    """Whether the weight's groups of 32 entries step through a row at one fixed stride that is a multiple of 16
    columns (within 3), as an N:M mask's do (2:4: every group spans 64 columns; a dense row 32): then the gather
    kernel's x without its skew slots serves the groups of a step from one shared-memory bank (a 2:4 weight at 4–8
    tokens on k ≥ 14336 ran at 0.22–0.46× of dense: BENCHMARKS.md, session 26). One fixed stride: the differences of
    consecutive group starts within a row have a standard deviation below 4 columns. Computed once per packed weight
    and kept on ``starts`` (a host sync the first time; recomputed after an in-place write); ``False`` inside a
    CUDA-graph capture that has not seen the weight."""
    try:
        key = (starts._version, gptr._version)
    except RuntimeError:  # inference tensors keep no version counter
        key = ()
    held = getattr(starts, "_layerprune_regular", None)
    if held is not None and held[0] == key:
        return held[1]
    if starts.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    g = starts.numel()
    if g < 2:
        found = False
    else:
        st = starts.to(torch.int32) & 0xFFFF
        step = (st[1:] - st[:-1]).float()
        same = torch.ones(g - 1, dtype=torch.bool, device=starts.device)
        last = gptr[1:-1].long() - 1  # a row's last group: the next group starts another row
        same[last[(last >= 0) & (last < g - 1)]] = False
        step = step[same]
        if step.numel() < 2:
            found = False
        else:
            mean, std = float(step.mean()), float(step.std())
            found = std < 4.0 and abs(mean - 16 * round(mean / 16)) <= 3.0 and mean >= 16
    starts._layerprune_regular = (key, found)
    return found


def settings(n: int, k: int, tokens: int = 1) -> tuple[int, int, int]:
    """(unroll, warps per block, blocks per SM or 0 for a warp per row) for an n × k weight: the best of
    bench/sparse_delta_cuda.py's sweep on the H200 (one token: geometric mean over 50/70/80%; within 2% of each
    shape's best, 4096 × 4096 and 8192 × 8192 within 1%)."""
    if tokens > 1:  # 16 warps: 1 block per SM (2 for two tokens)
        return 2, 16, 2 if tokens == 2 else 1
    if k > 8192:
        return 2, 16, 0
    if k == 8192:
        return 2, 8, 4
    return 2, 4, 8


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def cur_stream(dev: int) -> int:
    """The handle of device ``dev``'s current CUDA stream (PyTorch's raw accessor where it has one: a fraction of
    ``torch.cuda.current_stream``'s host time, which an eager prefill of a 7B model pays hundreds of times)."""
    return _raw_stream(dev) if _raw_stream is not None else torch.cuda.current_stream(dev).cuda_stream


@functools.cache
def capability(dev: int) -> tuple[int, int]:
    """Device ``dev``'s compute capability, asked once."""
    return torch.cuda.get_device_capability(dev)


@functools.cache
def _launcher():
    """``cuLaunchKernel`` with its argument types declared once. (PyTorch's ``_CudaKernel.__call__`` opens
    libcuda and converts its arguments on every call: tens of µs of CPU per launch, which showed in the
    one-token timings as the L2 flush's length whenever the launch fell behind the GPU.)"""
    lib = ctypes.CDLL("libcuda.so.1")
    f = lib.cuLaunchKernel
    u = ctypes.c_uint
    f.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


@functools.cache
def _packer(nptrs: int, nints: int) -> tuple[struct.Struct, int, ctypes.c_size_t]:
    """The layout of a kernel's parameters, ``nptrs`` 8-byte pointers then ``nints`` 4-byte ints (no padding falls
    between them), and the address of its size (kept alive with it), for cuLaunchKernel's ``extra``."""
    fmt = struct.Struct(f"={nptrs}Q{nints}i")
    size = ctypes.c_size_t(fmt.size)
    return fmt, ctypes.addressof(size), size


_EXTRA = ctypes.c_void_p * 5  # CU_LAUNCH_PARAM_BUFFER_POINTER, buffer, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, END


def _launch(kern, grid: tuple[int, ...], threads: int, smem: int, stream: int, ptrs, ints) -> None:
    """Launch ``kern`` on ``stream`` over ``grid`` (2 or 3 dimensions) with its pointer arguments (tensors, or device
    addresses as ints) then its int arguments, in the kernel's order, packed into one parameter buffer handed over
    through cuLaunchKernel's ``extra`` (a few µs less host time a launch than one ctypes object per argument); opts
    the kernel in to more than 48 KB of shared memory where ``smem`` needs it."""
    if smem >= 48 * 1024 and getattr(kern, "_max_shared_mem_bytes", 0) < smem:
        kern.set_shared_memory_config(smem)
    fmt, size_addr, _ = _packer(len(ptrs), len(ints))
    buf = ctypes.create_string_buffer(fmt.pack(*[t if isinstance(t, int) else t.data_ptr() for t in ptrs], *ints),
                                      fmt.size)
    extra = _EXTRA(1, ctypes.addressof(buf), 2, size_addr, 0)
    rc = _launcher()(kern.func, grid[0], grid[1], grid[2] if len(grid) > 2 else 1, threads, 1, 1, smem, stream,
                      None, extra)
    if rc != 0:
        raise RuntimeError(f"delta_cuda: cuLaunchKernel failed with CUDA error {rc}")


@functools.cache
def _props(device: int) -> tuple[int, int]:
    """(SMs, shared memory a block may opt in to) of a CUDA device."""
    p = torch.cuda.get_device_properties(device)
    return p.multi_processor_count, int(getattr(p, "shared_memory_per_block_optin", 48 * 1024))


_spmv_plans: dict[tuple[int, int, int, int], tuple] = {}  # (device, n, k, tokens ≤ 64) → spmv's default launch settings


def _spmv_plan(dev: int, n: int, k: int, B: int, unroll, warps, per_sm, tokens, skw) -> tuple | None:
    """(kernel, tokens a pass, warps a block, grid, shared memory, skew) of :func:`spmv`'s launches, or ``None``."""
    sms, limit = _props(dev)
    tokens = tokens or tokens_per_pass(B, k, limit)
    if not tokens:
        return None
    u0, w0, b0 = settings(n, k, tokens)
    unroll, warps, per_sm = unroll or u0, warps or w0, b0 if per_sm is None else per_sm
    kern = kernel(dev, unroll, tokens)
    if kern is None:
        return None
    if skw is None:
        skw = skew(tokens) if smem_bytes(k, tokens) <= limit else 0
    rows_grid = -(-n // warps)
    grid = min(sms * per_sm, rows_grid) if per_sm else rows_grid
    return kern, tokens, warps, grid, smem_bytes(k, tokens, skw), skw


def spmv(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor,
         n: int, k: int, unroll: int | None = None, warps: int | None = None,
         per_sm: int | None = None, tokens: int | None = None, skw: int | None = None) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 with W packed (delta layout), or ``None`` when the kernel is not
    available (the caller falls back). The B tokens go ``tokens`` at a time (default :func:`tokens_per_pass`),
    each pass one launch that reads the weight once. Settings default to :func:`settings`; ``per_sm`` 0 = a
    warp per row (a persistent grid is capped at one warp per row: measured no different, and no block
    without a row copies x); ``skw`` the skew slots per 16 columns of
    x (default :func:`skew`, 0 where the skewed x would not fit in shared memory)."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    B = x.shape[0]
    key = (dev, n, k, B)
    default = unroll is None and warps is None and per_sm is None and tokens is None and skw is None and B <= 64
    plan = _spmv_plans.get(key) if default else None
    if plan is None:
        plan = _spmv_plan(dev, n, k, B, unroll, warps, per_sm, tokens, skw)
        if plan is None:
            return None
        if default:
            _spmv_plans[key] = plan
    kern, tokens, warps, grid, smem, skw = plan
    x, y, done = io(x, n, k)
    if done:
        return y
    stream = cur_stream(x.device.index)
    for p in range(0, B, tokens):
        xp = x[p:]
        _launch(kern, (grid, 1), 32 * warps, smem, stream, (xp, values, deltas, starts, gptr, y[p:]),
                (n, k, int(xp.data_ptr() % 16 == 0), x.stride(0) if B > 1 else k, min(tokens, B - p), skw))
    return y


def unpack(values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor, n: int, k: int,
           unroll: int = 2, warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The dense (n × k) bf16 weight, written row by row through shared memory (16-byte stores), or ``None`` when
    the kernel is not available. ``warps`` per block default to as many row buffers (2·(k + PAD) bytes) as fit
    in 64 KB, at least one. Rows r0 … r1 − 1 only: ``gptr[r0:r1 + 1]`` and n = r1 − r0 (the row pointers index
    the whole weight's groups); ``out``: a contiguous (n × k) bf16 buffer to write into."""
    dev = values.device.index if values.device.index is not None else torch.cuda.current_device()
    sms, limit = _props(dev)
    rs = -(-(k + PAD) // 8) * 8
    if 2 * rs > limit:
        return None
    kern = kernel(dev, unroll, 1, "delta_unpack_bf16")
    if kern is None:
        return None
    if out is None:
        out = torch.empty(n, k, dtype=values.dtype, device=values.device)
    elif out.shape != (n, k) or not out.is_contiguous() or out.dtype != values.dtype:
        raise ValueError(f"unpack: out must be a contiguous ({n}, {k}) {values.dtype} tensor")
    if n == 0 or k == 0:
        return out
    warps = warps or max(1, min(8, (64 * 1024) // (2 * rs)))
    _launch(kern, (-(-n // warps), 1), 32 * warps, 2 * rs * warps, cur_stream(values.device.index),
            (values, deltas, starts, gptr, out), (n, k, rs, int(k % 8 == 0)))
    return out


def chunk_index(deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor, n: int, k: int,
                chunk: int = TILE[2]) -> torch.Tensor:
    """(n × (⌈k/chunk⌉ + 1)) int32 on the weight's device: entry [r, c] is the first group of row r whose last
    column (padding included) is ≥ c·chunk, the last entry gptr[r + 1]. The groups of row r that reach into chunk
    c are then [r, c] … min([r, c+1] + 1, [r, -1]) − 1 (the group at [r, c+1] may start inside chunk c)."""
    nch = -(-k // chunk)
    dev = gptr.device
    d = deltas.view(-1, 16).to(torch.int32)
    last = (starts.to(torch.int32) & 0xFFFF) - 1 + (d & 15).sum(1) + (d >> 4).sum(1) + 32
    rows = torch.repeat_interleave(torch.arange(n, device=dev), (gptr[1:] - gptr[:-1]).long(),
                                   output_size=starts.numel())  # no host sync (CUDA-graph capture)
    key = rows * (1 << 17) + last.long()
    qry = torch.arange(n, device=dev)[:, None] * (1 << 17) + torch.arange(nch, device=dev)[None, :] * chunk
    first = torch.searchsorted(key, qry.reshape(-1)).view(n, nch)
    return torch.cat([first.to(torch.int32), gptr[1:, None].to(torch.int32)], 1).contiguous()


def chunks_of(deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor, n: int, k: int,
              chunk: int = TILE[2]) -> torch.Tensor:
    """:func:`chunk_index`, computed once per packed weight and chunk width and kept on its ``gptr`` tensor
    (recomputed when a buffer was written in place since, as ``load_state_dict`` does)."""
    try:
        key = (chunk, gptr._version, deltas._version, starts._version)
    except RuntimeError:  # inference tensors keep no version counter (and cannot be written in place)
        key = (chunk,)
    kept = getattr(gptr, "_layerprune_chunks", None)
    if kept is None:
        kept = gptr._layerprune_chunks = {}
    held = kept.get(chunk)  # one index per chunk width (tile forms of other widths: bench/sparse_delta_cuda.py --tile)
    if held is None or held[0] != key:
        held = kept[chunk] = (key, chunk_index(deltas, starts, gptr, n, k, chunk))
    return held[1]


def tile_splits(n: int, nch: int, sms: int, rows: int) -> int:
    """Column splits of ``delta_tile_bf16``: about two blocks per SM over the tiles of ``rows`` rows, at most one
    chunk per split."""
    return max(1, min(nch, round(2 * sms / -(-n // rows))))


@functools.cache
def _counters(device: int, stream: int) -> torch.Tensor:
    """Zeroed per-row-tile counters of ``delta_tile_bf16``'s split reduction, one set per CUDA stream (launches on
    one stream run one after another; each leaves its counters at zero)."""
    return torch.zeros(1 << 16, dtype=torch.int32, device=torch.device("cuda", device))


def io(x: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """For a kernel call: x with unit column stride, the (B × n) output, and whether there is nothing to multiply
    (no rows, tokens or columns: then the output is already its answer, zeros)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    done = n == 0 or x.shape[0] == 0 or k == 0
    return x, y.zero_() if done else y, done


def split_buffers(x: torch.Tensor, dev: int, n: int, mt: int, tiles: int, s: int):
    """(stream, counters, fp32 partial sums) for a launch over ``tiles`` row groups and ``s`` column splits of a kernel
    that ends in ``finish_splits`` (with one split the counters stand in for the unused partial sums); ``None`` when
    there are more row groups than counters (the caller falls back)."""
    stream = cur_stream(x.device.index)
    count = _counters(dev, stream)
    if s > 1 and tiles > count.numel():
        return None
    return stream, count, torch.empty(s, mt, n, dtype=torch.float32, device=x.device) if s > 1 else count


def spmm_tile(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, cidx: torch.Tensor,
              n: int, k: int, splits: int | None = None, tile: tuple[int, int, int] = TILE,
              unroll: int = 4) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 on tensor cores (``delta_tile_bf16``: up to 64 tokens a pass, more in
    several), with ``cidx`` = :func:`chunk_index` for ``tile``'s chunk; ``None`` when the kernel is not
    available (before Ampere, or compiling failed)."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if capability(dev) < (8, 0):  # no bf16 tensor-core mma before Ampere
        return None
    wb, mw, kc = tile
    nch = -(-k // kc)
    if cidx.shape != (n, nch + 1):
        raise ValueError(f"spmm_tile: the chunk index has shape {tuple(cidx.shape)}, not {(n, nch + 1)} for chunk {kc}")
    sms, limit = _props(dev)
    B = x.shape[0]
    mt = next((t for t in MMA_TOKENS if t >= B), MMA_TOKENS[-1])
    rows = 16 * mw * wb
    smem = 2 * (mt + rows) * (kc + 8)
    if smem + rows * (8 + -(-kc // 32) + 2) + 4 > limit:
        return None
    kern = kernel(dev, unroll, 1, "delta_tile_bf16", mt, tile)
    if kern is None:
        return None
    x, y, done = io(x, n, k)
    if done:
        return y
    tiles = -(-n // rows)
    cps = -(-nch // (splits or tile_splits(n, nch, sms, rows)))
    s = -(-nch // cps)
    bufs = split_buffers(x, dev, n, mt, tiles, s)
    if bufs is None:
        return None
    stream, count, part = bufs
    for p in range(0, B, mt):
        xp = x[p:]
        vec = int(xp.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
        _launch(kern, (tiles, s), 32 * wb, smem, stream, (xp, values, deltas, starts, cidx, part, count, y[p:]),
                (n, k, min(mt, B - p), x.stride(0), cps, nch, vec))
    return y
