"""CUDA kernels for a weight in the ``nm24`` layout (:mod:`layerprune.sparse.nm24`): the product on the sparse tensor
cores (``nm24_mma_bf16``: ``mma.sp.m16n8k32``, bf16, fp32 accumulation) for 1–64 tokens, and the dense weight
(``nm24_unpack_bf16``) for larger batches and prefills (then cuBLAS).

The layout stores the A fragments and metadata words as the instruction takes them, so a warp loads its tiles
straight into registers: nothing is decoded, and the kernel streams the packed bytes. Measured on the H200 against
``F.linear`` on 2:4 weights of the LLaMA-2-7B / Llama-3-8B / LLaMA-2-70B shapes (BENCHMARKS.md, session 27; the
delta layout of the same weights in brackets): one token 1.41–1.68× on the eight shapes of 4096 rows or more
(1.38–1.58×), 1.11× on 1024 × 4096 (1.17×); eight tokens 1.19–1.52× there (0.51–0.80×); sixteen 1.00–1.40×
(0.47–0.68×); 32 0.64–1.00×, 64 0.51–0.67× (x staged whole; in 512-column chunks, the settings now used on weights
of 8192 rows or more, 0.89–1.07× and 0.57–0.86× there). Settings: :func:`settings`; which token counts come here:
``linear.nm24_kernel_wanted``.

Compiled at first use by NVRTC (``torch.cuda._compile_kernel``, as :mod:`delta_cuda`): compute capability 8.0 or
later; elsewhere :func:`usable` is false and the op unpacks with PyTorch.
"""

from __future__ import annotations

import functools
import logging

import torch

from layerprune.sparse import bitmask_wgmma, delta_cuda

log = logging.getLogger("layerprune")

SOURCE = delta_cuda.PRELUDE + r"""
// MT tokens a pass (8-64), MW m16 strips a warp, WB warps a block, UU column tiles in flight, CH columns of x staged at
// a time (0: the whole split). ldsm4, stage_x, cp_wait, to_bf and finish_splits come from delta_cuda.PRELUDE.

__device__ __forceinline__ void mma_sp(float* c, const uint4& a, u32 b0, u32 b1, u32 b2, u32 b3, u32 e) {
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e));
}

// y (nb × N) = x (nb × K) · Wᵀ, W in the nm24 layout. A block of WB warps owns WB·MW row strips of 16 and the
// columns k0 … k1 − 1 of its split (blockIdx.y; KC a split): x[MT × KC] is staged in shared memory (cp.async),
// then each warp streams its strips' tiles (UU column tiles' A fragments and metadata in flight, loaded straight
// into registers), reads the B fragments of 8 tokens with one ldmatrix.x4 and issues one mma.sp per strip and 8
// tokens. Several splits: fp32 partial sums, the last block of a row group adds them (finish_splits).
extern "C" __global__ void __launch_bounds__(32 * WB, MINB) nm24_mma_bf16(
        const u16* __restrict__ x, const uint4* __restrict__ vals, const u32* __restrict__ meta,
        float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int nb, int sxb, int KC, int vec)
{
    extern __shared__ __align__(16) u16 xs[];  // MT × (CW + 8)
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int CW = CH ? CH : KC;  // columns of x staged at a time: CH (a multiple of 32·UU), or the whole split
    const int KT = K >> 5, XS = CW + 8;
    const int k0 = blockIdx.y * KC, k1 = min(K, k0 + KC);
    const int strip0 = (blockIdx.x * WB + warp) * MW;
    const int kt0 = k0 >> 5, kt1 = k1 >> 5;
    const int ml = 2 * g + (tig & 1);  // this lane's metadata word (lanes 4g + 2, 4g + 3 load a copy: unused)
    float acc[MW][MT / 8][4];
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int j = 0; j < MT / 8; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
    uint4 a[UU][MW], a2[UU][MW];
    u32 e[UU][MW], e2[UU][MW];
    bool live[MW];
#pragma unroll
    for (int m = 0; m < MW; ++m) live[m] = (strip0 + m) * 16 < N;
#pragma unroll
    for (int u = 0; u < UU; ++u)
#pragma unroll
        for (int m = 0; m < MW; ++m) {
            const int kt = min(kt0 + u, kt1 - 1), s = live[m] ? strip0 + m : 0;
            const size_t tile = (size_t)s * KT + kt;
            a[u][m] = __ldcs(vals + tile * 32 + lane);
            e[u][m] = __ldcs(meta + tile * 16 + ml);
        }
    int cbase = k0, cend = k0;  // the columns of x in shared memory
    for (int kb = kt0; kb < kt1; kb += UU) {
        if ((kb << 5) >= cend) {  // the next chunk of x (block-uniform); its UU-tile groups never straddle chunks
            cbase = kb << 5;
            cend = min(k1, cbase + CW);
            if (kb != kt0) __syncthreads();  // every warp is done with the previous chunk
            stage_x(xs, x, sxb, nb, K, cbase, CW, MT, XS, vec, tid, 32 * WB);
            cp_wait();
            __syncthreads();
        }
        if (kb + UU < kt1) {
#pragma unroll
            for (int u = 0; u < UU; ++u)
#pragma unroll
                for (int m = 0; m < MW; ++m) {
                    const int kt = min(kb + UU + u, kt1 - 1), s = live[m] ? strip0 + m : 0;
                    const size_t tile = (size_t)s * KT + kt;
                    a2[u][m] = __ldcs(vals + tile * 32 + lane);
                    e2[u][m] = __ldcs(meta + tile * 16 + ml);
                }
        }
#pragma unroll
        for (int u = 0; u < UU; ++u) {
            if (kb + u < kt1) {
                const int c = ((kb + u) << 5) - cbase;
#pragma unroll
                for (int j = 0; j < MT / 8; ++j) {
                    u32 b0, b1, b2, b3;
                    ldsm4(b0, b1, b2, b3, xs + (8 * j + (lane & 7)) * XS + c + 8 * (lane >> 3));
#pragma unroll
                    for (int m = 0; m < MW; ++m) mma_sp(acc[m][j], a[u][m], b0, b1, b2, b3, e[u][m]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UU; ++u)
#pragma unroll
            for (int m = 0; m < MW; ++m) { a[u][m] = a2[u][m]; e[u][m] = e2[u][m]; }
    }
    const bool one = gridDim.y == 1;
    float* out = part + (size_t)blockIdx.y * nb * N;
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int j = 0; j < MT / 8; ++j)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int tk = 8 * j + 2 * tig + (h & 1), rr = (strip0 + m) * 16 + g + 8 * (h >> 1);
                if (tk < nb && rr < N) {
                    if (one) y[(size_t)tk * N + rr] = to_bf(acc[m][j][h]);
                    else out[(size_t)tk * N + rr] = acc[m][j][h];
                }
            }
    if (!one) finish_splits(part, count, y, N, nb, blockIdx.x * WB * MW * 16, WB * MW * 16, &last_block);
}

#if WGMMA
WG_HELPERS
WG_SP_FN

// x[t][c0 … c0 + cw − 1] (tokens t < MT; cw a multiple of 32) into shared memory as wgmma's K-major B operand without
// swizzle: core matrices of 8 tokens × 8 columns (128 bytes), the next along K 128 bytes on, the next 8 tokens cw·16
// bytes on. 32 lanes fill 512 contiguous bytes (8 tokens × 32 columns) and read 64 bytes of each token row; tokens past
// nb and columns past K are zeros. Every thread calls it; the caller waits, fences the async proxy and syncs.
__device__ __forceinline__ void stage_cm(u16* xs, const u16* __restrict__ x, int sxb, int nb, int K, int c0, int cw,
                                         int vec, int tid, int nthreads) {
    const int q = cw >> 5;
    for (int i = tid; i < MT * (cw >> 3); i += nthreads) {
        const int rest = i >> 5, t = (rest / q) * 8 + (i & 7), c8 = (rest % q) * 4 + ((i >> 3) & 3), col = c0 + c8 * 8;
        u16* dst = xs + (t >> 3) * (cw * 8) + c8 * 64 + (t & 7) * 8;
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

// the descriptor of the 32 columns from column c of the staged x (leading byte offset 128: the next 8 columns; stride
// byte offset cw·16: the next 8 tokens)
__device__ __forceinline__ u64 desc_cm(const u16* xs, int c, int cw) {
    const u32 a = (u32)__cvta_generic_to_shared(xs + c * 8);
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(cw & 0x3FFF) << 32);
}

// nm24_mma_bf16 on Hopper's warpgroup instructions: each warp still streams its 16-row strip's A fragments and
// metadata straight into registers (the same bytes: wgmma.sp's register A operand and metadata sit, per warp, as
// mma.sp.m16n8k32's), but a warpgroup's four strips share one wgmma.sp.m64n{MT}k32 per column tile that reads x
// from shared memory itself, so x is read from shared memory once per 64 rows instead of once per 16 (ldmatrix)
// and no B fragments pass through registers. WB a multiple of 4 (warpgroups of consecutive strips); MW groups of
// WB strips a block, each warp one strip in each.
extern "C" __global__ void __launch_bounds__(32 * WB, MINB) nm24_wg_bf16(
        const u16* __restrict__ x, const uint4* __restrict__ vals, const u32* __restrict__ meta,
        float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int nb, int sxb, int KC, int vec)
{
    extern __shared__ __align__(128) u16 xs[];  // MT × CW, core-matrix order (stage_cm)
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int CW = CH ? CH : KC;
    const int KT = K >> 5;
    const int k0 = blockIdx.y * KC, k1 = min(K, k0 + KC);
    const int kt0 = k0 >> 5, kt1 = k1 >> 5;
    const int ml = 2 * g + (tig & 1);
    // MW row groups of WB strips a block; this warp's strip in group m: (blockIdx.x·MW + m)·WB + warp
    size_t row0[MW];
#pragma unroll
    for (int m = 0; m < MW; ++m) {
        const int strip = (blockIdx.x * MW + m) * WB + warp;
        row0[m] = (size_t)(strip * 16 < N ? strip : 0) * KT;
    }
    float acc[MW][MT / 2];
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int i = 0; i < MT / 2; ++i) acc[m][i] = 0.f;
    uint4 a[UU][MW], a2[UU][MW];
    u32 e[UU][MW], e2[UU][MW];
#pragma unroll
    for (int u = 0; u < UU; ++u)
#pragma unroll
        for (int m = 0; m < MW; ++m) {
            const size_t tile = row0[m] + min(kt0 + u, kt1 - 1);
            a[u][m] = __ldcs(vals + tile * 32 + lane);
            e[u][m] = __ldcs(meta + tile * 16 + ml);
        }
    int cbase = k0, cend = k0;
    for (int kb = kt0; kb < kt1; kb += UU) {
        if ((kb << 5) >= cend) {  // the next chunk of x (block-uniform)
            cbase = kb << 5;
            cend = min(k1, cbase + CW);
            if (kb != kt0) __syncthreads();  // every warpgroup's products of the previous chunk are done (waited below)
            stage_cm(xs, x, sxb, nb, K, cbase, CW, vec, tid, 32 * WB);
            cp_wait();
            fence_async();
            __syncthreads();
        }
        if (kb + UU < kt1) {
#pragma unroll
            for (int u = 0; u < UU; ++u)
#pragma unroll
                for (int m = 0; m < MW; ++m) {
                    const size_t tile = row0[m] + min(kb + UU + u, kt1 - 1);
                    a2[u][m] = __ldcs(vals + tile * 32 + lane);
                    e2[u][m] = __ldcs(meta + tile * 16 + ml);
                }
        }
        wg_fence();
#pragma unroll
        for (int u = 0; u < UU; ++u)
            if (kb + u < kt1) {
                const u64 db = desc_cm(xs, ((kb + u) << 5) - cbase, CW);
#pragma unroll
                for (int m = 0; m < MW; ++m) wg_sp(acc[m], a[u][m], db, e[u][m]);
            }
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int m = 0; m < MW; ++m)
#pragma unroll
            for (int i = 0; i < MT / 2; ++i) pin(acc[m][i]);
#pragma unroll
        for (int u = 0; u < UU; ++u)  // the products read a and e until here: a2 and e2 may not take their registers
#pragma unroll
            for (int m = 0; m < MW; ++m) {
                pin(a[u][m].x); pin(a[u][m].y); pin(a[u][m].z); pin(a[u][m].w); pin(e[u][m]);
                a[u][m] = a2[u][m];
                e[u][m] = e2[u][m];
            }
    }
    const bool one = gridDim.y == 1;
    float* out = part + (size_t)blockIdx.y * nb * N;
    // wgmma's accumulators sit as mma's, per warp: acc[m][4j + h] is row g + 8·(h >> 1), token 8j + 2·tig + (h & 1)
#pragma unroll
    for (int m = 0; m < MW; ++m)
#pragma unroll
        for (int j = 0; j < MT / 8; ++j)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const int tk = 8 * j + 2 * tig + (h & 1), rr = ((blockIdx.x * MW + m) * WB + warp) * 16 + g + 8 * (h >> 1);
                if (tk < nb && rr < N) {
                    if (one) y[(size_t)tk * N + rr] = to_bf(acc[m][4 * j + h]);
                    else out[(size_t)tk * N + rr] = acc[m][4 * j + h];
                }
            }
    if (!one) finish_splits(part, count, y, N, nb, blockIdx.x * MW * WB * 16, MW * WB * 16, &last_block);
}

#if CH > 0  // nm24_wgp_bf16 stages x in chunks
#ifndef NS
#define NS 4
#endif
#define SB (UU * 576)  // bytes of a stage of a warp's ring: UU tiles' A fragments (512 bytes each), then their metadata
__device__ __forceinline__ u32 sptr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mb_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mb_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mb_wait(u32 bar, u32 parity) {
    u32 ok = 0;
    while (!ok)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// nm24_wg_bf16 with the weight streamed ahead through shared memory: each warp keeps a ring of NS stages of UU tiles
// (its strip's A fragments and metadata are contiguous, so lane 0 fetches a stage with two bulk copies that complete
// on the stage's mbarrier) NS − 1 stages ahead of the tiles it multiplies, and x goes in chunks of CH columns (CH > 0)
// into two buffers, the next chunk copied while the current one is used. Shared memory: 2·MT·CH·2 bytes of x, then
// WB·NS·SB bytes of rings, then the WB·NS mbarriers.
extern "C" __global__ void __launch_bounds__(32 * WB, MINB) nm24_wgp_bf16(
        const u16* __restrict__ x, const uint4* __restrict__ vals, const u32* __restrict__ meta,
        float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int nb, int sxb, int KC, int vec)
{
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int KT = K >> 5;
    const int k0 = blockIdx.y * KC, k1 = min(K, k0 + KC);
    const int kt0 = k0 >> 5, kt1 = k1 >> 5;
    const int ml = 2 * g + (tig & 1);
    const int strip = blockIdx.x * WB + warp;
    const size_t row0 = (size_t)(strip * 16 < N ? strip : 0) * KT;
    u16* xb = reinterpret_cast<u16*>(sm);
    unsigned char* ring = sm + 4 * MT * CH + warp * NS * SB;
    const u32 bars = sptr(sm + 4 * MT * CH + WB * NS * SB) + warp * NS * 8;
    const int groups = (kt1 - kt0 + UU - 1) / UU;
    auto issue = [&](int q) {  // lane 0: group q of this warp's tiles into stage q % NS
        const int st = q % NS, t0 = kt0 + q * UU, nt = min(UU, kt1 - t0);
        const u32 dst = sptr(ring + st * SB), bar = bars + 8 * st;
        mb_expect(bar, nt * 576);
        bulk(dst, vals + (row0 + t0) * 32, nt * 512, bar);
        bulk(dst + UU * 512, meta + (row0 + t0) * 16, nt * 64, bar);
    };
    if (lane == 0) {
        for (int st = 0; st < NS; ++st) mb_init(bars + 8 * st);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        for (int q = 0; q < NS - 1 && q < groups; ++q) issue(q);
    }
    __syncwarp();
    stage_cm(xb, x, sxb, nb, K, k0, CH, vec, tid, 32 * WB);
    cp_commit();
    float acc[MT / 2];
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) acc[i] = 0.f;
    uint4 a[UU];
    u32 e[UU];
    int cur = -1;
    for (int q = 0; q < groups; ++q) {
        const int kb = kt0 + q * UU, ci = ((kb - kt0) << 5) / CH;
        if (ci != cur) {  // a new chunk of x (block-uniform; groups never straddle chunks)
            cur = ci;
            cp_wait();  // this chunk landed (the only copies in flight)
            fence_async();
            __syncthreads();  // ... for every thread; and every warp is done with the previous chunk's buffer
            if (k0 + (ci + 1) * CH < k1) {
                stage_cm(xb + ((ci + 1) & 1) * MT * CH, x, sxb, nb, K, k0 + (ci + 1) * CH, CH, vec, tid, 32 * WB);
                cp_commit();
            }
        }
        const u16* xs = xb + (ci & 1) * MT * CH;
        const int st = q % NS;
        mb_wait(bars + 8 * st, (q / NS) & 1);
        const unsigned char* sp = ring + st * SB;
#pragma unroll
        for (int u = 0; u < UU; ++u) {
            a[u] = *reinterpret_cast<const uint4*>(sp + u * 512 + lane * 16);
            e[u] = *reinterpret_cast<const u32*>(sp + UU * 512 + u * 64 + ml * 4);
        }
        __syncwarp();  // every lane has its registers: the stage may be refilled
        if (lane == 0 && q + NS - 1 < groups) {
            fence_async();
            issue(q + NS - 1);
        }
        wg_fence();
#pragma unroll
        for (int u = 0; u < UU; ++u)
            if (kb + u < kt1) wg_sp(acc, a[u], desc_cm(xs, ((kb + u) << 5) - (k0 + ci * CH), CH), e[u]);
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
#pragma unroll
        for (int u = 0; u < UU; ++u) { pin(a[u].x); pin(a[u].y); pin(a[u].z); pin(a[u].w); pin(e[u]); }
    }
    const bool one = gridDim.y == 1;
    float* out = part + (size_t)blockIdx.y * nb * N;
#pragma unroll
    for (int j = 0; j < MT / 8; ++j)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const int tk = 8 * j + 2 * tig + (h & 1), rr = strip * 16 + g + 8 * (h >> 1);
            if (tk < nb && rr < N) {
                if (one) y[(size_t)tk * N + rr] = to_bf(acc[4 * j + h]);
                else out[(size_t)tk * N + rr] = acc[4 * j + h];
            }
        }
    if (!one) finish_splits(part, count, y, N, nb, blockIdx.x * WB * 16, WB * 16, &last_block);
}
#endif  // CH > 0
#endif  // WGMMA

// The dense weight: thread (tile, lane) writes the four groups of four columns whose kept values its A fragment
// holds (groups t and t + 4 of rows g and g + 8), 8 bytes each, zeros included: no other thread writes them.
extern "C" __global__ void nm24_unpack_bf16(const uint4* __restrict__ vals, const u32* __restrict__ meta,
                                            u16* __restrict__ out, int N, int K, int tiles)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tiles * 32) return;
    const int tile = i >> 5, lane = i & 31, g = lane >> 2, t = lane & 3, KT = K >> 5;
    const int r0 = (tile / KT) * 16 + g, c0 = (tile % KT) * 32;
    const uint4 v = vals[i];
    const u32 m0 = meta[(size_t)tile * 16 + 2 * g], m1 = meta[(size_t)tile * 16 + 2 * g + 1];
    const u32 pv[4] = {v.x, v.y, v.z, v.w};
    const u32 pm[4] = {m0, m0 >> 16, m1, m1 >> 16};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const u32 m = pm[q] >> (4 * t);
        const int p0 = m & 3, p1 = (m >> 2) & 3;
        const unsigned long long w = ((unsigned long long)(pv[q] & 0xFFFFu) << (16 * p0))
                                   | ((unsigned long long)(pv[q] >> 16) << (16 * p1));
        const int row = r0 + 8 * (q & 1), col = c0 + 4 * (t + 4 * (q >> 1));
        *reinterpret_cast<uint2*>(out + (size_t)row * K + col) = make_uint2((u32)w, (u32)(w >> 32));
    }
}
"""

MMA_TOKENS = (8, 16, 32, 64)  # tokens a pass
_failed: set[int] = set()


def usable(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernels can take this call: a CUDA device of compute capability 8.0 or later whose kernels
    compiled (or can be tried), bf16 x and values, 16-byte aligned values."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and values.dtype == torch.bfloat16 and torch.version.hip is None
            and hasattr(torch.cuda, "_compile_kernel") and values.data_ptr() % 16 == 0):
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return dev not in _failed and torch.cuda.get_device_capability(dev) >= (8, 0)


def _sp_fn(mt: int) -> str:
    """``wg_sp(d, a, db, e)``: d (``mt``/2 fp32 a thread) += A (64 × 32 at 2:4: the four warps' fragments, metadata e)
    · B (32 × ``mt``, shared-memory descriptor db)."""
    n = mt // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return ("__device__ __forceinline__ void wg_sp(float* d, const uint4& a, u64 db, u32 e) {\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 6}, 0;\\n"\n'
            f'                 "wgmma.mma_async.sp.sync.aligned.m64n{mt}k32.f32.bf16.bf16 {{{regs}}}, '
            f'{{%{n}, %{n + 1}, %{n + 2}, %{n + 3}}}, %{n + 4}, %{n + 5}, 0, p, 1, 1, 0;\\n}}\\n"\n'
            f'                 : {outs}\n'
            '                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(db), "r"(e), "r"(1));\n}\n')


def source(mt: int, mw: int = 1, wb: int = 8, uu: int = 4, ch: int = 0, wg: bool = False, minb: int = 1,
           ns: int = 4) -> str:
    """The CUDA source for ``mt`` tokens a pass; ``wg``: with the sm_90a kernel ``nm24_wg_bf16`` (``wb`` a multiple
    of 4); ``minb``: blocks a SM the registers must leave room for (``__launch_bounds__``)."""
    if wg and wb % 4:
        raise ValueError(f"nm24_wg_bf16: whole warpgroups ({wb} warps a block)")
    head = (f"#define MT {mt}\n#define MW {mw}\n#define WB {wb}\n#define UU {uu}\n#define CH {ch}\n#define WGMMA {int(wg)}\n"
            f"#define MINB {minb}\n#define NS {ns}\n")
    return head + SOURCE.replace("WG_HELPERS", bitmask_wgmma.WG_HELPERS if wg else "").replace(
        "WG_SP_FN", _sp_fn(mt) if wg else "")


@functools.cache
def _kernel(device: int, name: str, mt: int, mw: int, wb: int, uu: int, ch: int = 0, wg: bool = False, minb: int = 1,
            ns: int = 4):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, mw, wb, uu, ch, wg, minb, ns), name, nvcc_options=["--use_fast_math"],
                                          **({"compute_capability": "90a"} if wg else {}))


def kernel(device: int, name: str, mt: int = 8, mw: int = 1, wb: int = 8, uu: int = 4, ch: int = 0, wg: bool = False,
           minb: int = 1, ns: int = 4):
    """The compiled kernel, or ``None`` when it cannot be compiled here (one warning; the caller unpacks)."""
    try:
        return _kernel(device, name, mt, mw, wb, uu, ch, wg, minb, ns)
    except (RuntimeError, OSError, AttributeError, TypeError) as e:
        _failed.add(device)
        log.warning("the nm24 CUDA kernels did not compile (%s); unpacking with PyTorch", str(e).splitlines()[0][:160])
        return None


def hopper(device: int) -> bool:
    """Whether ``nm24_wg_bf16`` can run here (compute capability 9.0: sm_90a code runs only there)."""
    return torch.cuda.get_device_capability(device) == (9, 0)


def settings(n: int, k: int, tokens: int) -> tuple[int, ...]:
    """(m16 strips a warp, warps a block, column tiles in flight, columns of x staged at a time or 0 for the whole
    split, 1 for the Hopper wgmma kernel, blocks a SM the registers leave room for, 1 to prefer shared memory over L1),
    from ``bench/probe_nm24.py`` on the H200 (session 27). Up to 16 tokens: on weights of 14336 rows or 28672
    columns or more two strips a warp (each B fragment serves both), else one (within 1% of the best of four
    variants on 8 of the 9 shapes, up to 6% short on 14336 × 4096). 17–64 tokens on weights of 8192 rows or more: x
    staged 512 columns at a time, so that few column splits (fp32 partial sums) are needed and x no longer limits
    the blocks a SM (at 64 tokens 0.51–0.56× → 0.57–0.86× on those five shapes; at 32 0.72–0.91× → 0.89–1.07×)."""
    if tokens > 16 and n >= 8192:
        return 1, 8, 4, 512, 0, 1, 0, 4
    return (2, 8, 4, 0, 0, 1, 0, 4) if n >= 14336 or k >= 28672 else (1, 8, 4, 0, 0, 1, 0, 4)


def split_columns(k: int, tiles: int, sms: int, mt: int, ch: int = 0) -> int:
    """Columns a split (a multiple of 64, or of ``ch``): about four blocks a SM over the row groups; with the whole
    split's x staged at once (``ch`` = 0) also x within 96 KB."""
    want = max(1, round(4 * sms / tiles))
    step = ch or 64
    kc = max(step, -(-(-(-k // want)) // step) * step)
    return kc if ch else min(kc, max(64, (96 * 1024 // (2 * mt) - 8) // 64 * 64))


def spmm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, k: int,
         variant: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 on the sparse tensor cores (up to 64 tokens a pass, more in several), or
    ``None`` when the kernel is not available here. ``variant``: (strips a warp, warps a block, tiles in flight[,
    columns of x staged at a time, 0 for the whole split]), default :func:`settings`."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    B = x.shape[0]
    mt = next((t for t in MMA_TOKENS if t >= B), MMA_TOKENS[-1])
    mw, wb, uu, ch, wg, minb, carve, ns = ((tuple(variant) + (0, 0, 1, 0, 4)[len(variant) - 3:])[:8] if variant
                                          else settings(n, k, B))
    if ch % (32 * uu):
        raise ValueError(f"nm24: {ch} columns of x a chunk is not a multiple of 32 × {uu} tiles in flight")
    wg = wg if hopper(dev) else 0
    if wg == 2 and not ch:
        raise ValueError("nm24_wgp_bf16 stages x in chunks: give the columns of a chunk")
    name = ("nm24_mma_bf16", "nm24_wg_bf16", "nm24_wgp_bf16")[wg]
    kern = kernel(dev, name, mt, mw, wb, uu, ch, wg > 0, minb, ns)
    if kern is None:
        return None
    if carve:
        delta_cuda.prefer_shared(kern)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if n == 0 or B == 0:
        return y
    sms, _ = delta_cuda._props(dev)
    tiles = -(-n // (16 * mw * wb))
    kc = split_columns(k, tiles, sms, mt, ch)
    s = -(-k // kc)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    count = delta_cuda._counters(dev, stream)
    if s > 1 and tiles > count.numel():
        return None
    part = torch.empty(s, mt, n, dtype=torch.float32, device=x.device) if s > 1 else count
    for p in range(0, B, mt):
        xp = x[p:]
        vec = int(xp.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
        smem = 4 * mt * ch + wb * ns * (uu * 576 + 8) if wg == 2 else 2 * mt * ((ch or kc) + 8)
        delta_cuda._launch(kern, (tiles, s), 32 * wb, smem, stream,
                           (xp, values, meta, part, count, y[p:]),
                           (n, k, min(mt, B - p), x.stride(0), kc, vec))
    return y


def unpack(values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The dense (n × k) bf16 weight, or ``None`` when the kernel is not available here (bit-exact)."""
    dev = values.device.index if values.device.index is not None else torch.cuda.current_device()
    kern = kernel(dev, "nm24_unpack_bf16")
    if kern is None:
        return None
    out = torch.empty(n, k, dtype=values.dtype, device=values.device)
    tiles = (n // 16) * (k // 32)
    if tiles:
        delta_cuda._launch(kern, (-(-tiles * 32 // 256), 1), 256, 0, torch.cuda.current_stream(values.device).cuda_stream,
                           (values, meta, out), (n, k, tiles))
    return out
