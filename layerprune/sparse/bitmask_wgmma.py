"""Hopper (sm_90a) tensor-core product for a ``bitmask``-packed weight (16 × 128 tiles): ``bm_wg_bf16``.

The decode is :mod:`layerprune.sparse.bitmask_cuda`'s (a lane's positions of the A fragment, their values found by
popcounts, loaded straight into registers), but the products run on ``wgmma`` with A from registers (the "RS" form
of ``wgmma.mma_async``) instead of ``mma.sync``:

* A warpgroup (4 warps) owns 64 rows: warp i decodes row block i (16 rows) of a column tile into its
  ``m64nMTk16`` A registers; those are, per warp, the ``mma.sync.m16n8k16`` A fragment the decode already makes.
* x (B, ``MT`` tokens × 128 columns) is staged by ``cp.async`` in the no-swizzle core-matrix layout and read by the
  tensor cores straight from shared memory, once per warpgroup (64 rows). The mma.sync kernel read every x fragment
  with ``ldmatrix`` once per warp (16 rows) and issued ``MT``/8 ``mma`` per 16 columns; here one ``wgmma`` per 16
  columns and warpgroup does the products of all tokens, asynchronously.
* ``TWO`` = 1: two register sets, so tile j + 1 is decoded while the tensor cores run tile j (``wgmma.wait_group
  1``); ``TWO`` = 0: one set (fewer registers, more warps a SM; the overlap comes from other warpgroups).
* The stages: x of a tile may be read by the tensor cores until that tile's group is waited for, so a stage is
  written again only after every warpgroup of the block has waited (a block barrier); loads run NST − 2 tiles
  ahead (``TWO``) or NST − 1 (one set: its wait precedes the barrier).
* Column splits (``blockIdx.y``) add up as in the other tile kernels (fp32 partial sums, the last block of a row
  group writes y); token blocks of ``MT`` (``blockIdx.z``) for prefill, without splits.

* x's stage layout: the 128-byte swizzle (each token's 64 columns a 128-byte row, 16-byte chunk c of row t at
  c ^ (t % 8)), or with ``swz`` off the no-swizzle core-matrix layout (up to 9% slower in the
  sweep, level on a few shapes).

Measured on the H200 at 70%, side by side with the mma.sync kernel (BENCHMARKS.md, session 21): 2–7% faster at 32
tokens and 3–10% at 64 on 7B/8B/70B weights of 50 M or more (28672 × 8192 at 64 tokens: 193 against 213 µs, 0.66×
of dense); slower on small weights and at 16 tokens or fewer. :func:`wanted` sends it only what it won. Where the
time goes (``bench/probe_wgmma_bitmask_parts.py``): the decode, as in the mma.sync kernel; the tensor cores are a
small part. In a 2048-token prefill it runs at 0.25–0.28× of dense: the accumulators of 128–256 tokens fill a
warpgroup's registers for only 64 rows, so a block shares each x stage among 128 rows, and its copies and barriers
alone (no decode, no products) took 150–165 µs on 4096 × 4096 against dense's 90. The op keeps unpack + cuBLAS
there.

Compiled at first use by NVRTC for ``sm_90a`` (``wgmma`` exists only there): compute capability 9.0 only; elsewhere
:func:`spmm` returns ``None`` and the caller keeps the mma.sync kernel.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from layerprune.sparse import bitmask_cuda, delta_cuda

log = logging.getLogger("layerprune")

TOKENS = (8, 16, 24, 32, 40, 48, 56, 64, 128, 256)  # tokens a pass (the wgmma's n)
_failed: set[int] = set()

SOURCE = delta_cuda.PRELUDE + bitmask_cuda.DECODE + r"""
#ifndef PROBE
#define PROBE 0  // timing probes only: 1 = no decode, 2 = no products, 3 = neither
#endif
// MT (tokens a pass), NWG (warpgroups a block), NST (stages), CAP (values slot), TWO (register sets: 1 or 0)
#define WB (4 * NWG)
#define VS (CAP + 8)
#define XB (MT * 256)  // bytes of a stage's x: MT tokens × 128 columns, bf16
#define WSLOT (256 + VS * 2)  // bytes of a warp's bitmask and values in a stage
#define STAGE (((XB + WB * WSLOT) + 1023) / 1024 * 1024)  // 1024-byte aligned (the swizzle atoms)
#define AHEAD (TWO ? NST - 2 : NST - 1)  // tiles loaded ahead of the one decoded

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int P> __device__ __forceinline__ void cp_wait_n() { asm volatile("cp.async.wait_group %0;\n" :: "n"(P)); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int P> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(P) : "memory");
}
__device__ __forceinline__ void fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }

// descriptor of a K-major no-swizzle B tile: core matrices of 8 tokens × 16 bytes, the next one along K 128 bytes
// on (leading byte offset), the next 8 tokens 2048 bytes on (stride byte offset: 16 core matrices of 128 columns)
__device__ __forceinline__ u64 desc(const void* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(2048 >> 4) << 32);
}

// byte offset in a stage's x of 16-byte chunk i (the copy order: lanes 0-7 the 8 tokens of one chunk column, then the
// next chunk column): token t = (i >> 7)·8 + i % 8, chunk column c8 = ((i >> 4) % 8)·2 + (i >> 3) % 2. SWZ = 0: core
// matrices (8 tokens × 16 bytes) one after another along K, 8-token groups 2048 bytes apart; SWZ = 1: two halves of 64
// columns, each token's 128 bytes a row, chunk c of row t at c ^ (t % 8) (the 128-byte swizzle)
__device__ __forceinline__ int xoff(int i) {
#if SWZ
    const int t = ((i >> 7) << 3) + (i & 7), c8 = ((i >> 4) & 7) * 2 + ((i >> 3) & 1);
    return (c8 >> 3) * (MT * 128) + t * 128 + (((c8 & 7) ^ (t & 7)) << 4);
#else
    return i * 16;
#endif
}

// the descriptor of columns 16s … 16s + 15 of a stage's x
__device__ __forceinline__ u64 desc_at(const unsigned char* xt, int s) {
#if SWZ
    const u32 a = (u32)__cvta_generic_to_shared(xt + (s >> 2) * (MT * 128) + (s & 3) * 32);
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
#else
    return desc(xt + s * 256);
#endif
}

WG_MMA_FN

// a warp's 16 × 128 tile into A registers (a[s]: columns 16s … 16s + 15; a lane's positions as in mma.m16n8k16,
// which are, per warp, those of wgmma's register A operand)
__device__ __forceinline__ void decode(u32 (&a)[8][4], const unsigned char* wb, int o0, int g, const u32* below) {
    const Rows rows = tile_rows(wb, o0, g);
#pragma unroll
    for (int s = 0; s < 8; ++s) slice(rows, below, threadIdx.x & 3, s, a[s][0], a[s][1], a[s][2], a[s][3]);
}

extern "C" __global__ void __launch_bounds__(128 * NWG) bm_wg_bf16(
        const u16* __restrict__ x, const u32* __restrict__ bits, const u16* __restrict__ vals,
        const int* __restrict__ offs, float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int KT, int nb, int sxb, int CPS, int vec, int nnz)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ int last_block;
    __shared__ int o0s[NST][WB];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int rb = blockIdx.x * WB + warp;
    const bool live = rb * 16 < N;
    const int ca = blockIdx.y * CPS, cb = min(KT, ca + CPS), cnt = cb - ca;
    const size_t t0 = (size_t)rb * KT + ca;
    x += (size_t)blockIdx.z * MT * sxb;
    y += (size_t)blockIdx.z * MT * N;
    nb = min(MT, nb - (int)blockIdx.z * MT);
    // x rows past nb stay zero in every stage
    for (int st = 0; st < NST; ++st) {
        unsigned char* xt = smem + st * STAGE;
        for (int i = tid; i < MT * 16; i += 128 * NWG) {
            const int t = ((i >> 7) << 3) + (i & 7);  // the order of issue()
            if (t >= nb) *reinterpret_cast<uint4*>(xt + xoff(i)) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    int win = 0;
    int off = live && lane <= cnt ? offs[t0 + lane] : 0;

    // chunk i of a stage's x (16 bytes): lanes 0-7 the 8 tokens of a core matrix, then the next 8 columns, so that
    // 32 lanes write 512 contiguous bytes and read 32 bytes of each token row
    auto issue = [&](int j) {
        const int st = j % NST;
        unsigned char* base = smem + st * STAGE;
        const int c0 = (ca + j) * 128;
        for (int i = tid; i < MT * 16; i += 128 * NWG) {
            const int t = ((i >> 7) << 3) + (i & 7), c8 = ((i >> 4) & 7) * 2 + ((i >> 3) & 1), col = c0 + c8 * 8;
            if (t < nb) x_chunk(reinterpret_cast<u16*>(base + xoff(i)), x + (size_t)t * sxb + col, col, K, vec);
        }
        int o0, o1;
        tile_offsets(offs, t0, j, cnt, live, lane, win, off, o0, o1);
        if (lane == 0) o0s[st][warp] = o0;
        if (live) stage_tile(base + XB + warp * WSLOT, bits, vals, t0 + j, o0, o1, nnz, lane);
    };

    float acc[MT / 2];
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) acc[i] = 0.f;
    const u32 below[4] = {(1u << (2 * tig)) - 1u, (1u << (2 * tig + 8)) - 1u, (1u << (2 * tig + 16)) - 1u,
                          (1u << (2 * tig + 24)) - 1u};
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
        if (j < cnt) issue(j);
        cp_commit();
    }
    auto step = [&](int j, u32 (&a)[8][4]) {
        if (TWO) wg_wait<1>(); else wg_wait<0>();  // this warpgroup's products of the tile whose stage is next written
#pragma unroll
        for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
        cp_wait_n<AHEAD - 1>();  // tile j landed
        fence_async();
        __syncthreads();
        if (j + AHEAD < cnt) issue(j + AHEAD);
        cp_commit();
        const int st = j % NST;
        const unsigned char* base = smem + st * STAGE;
        if (live && !(PROBE & 1)) {
            decode(a, base + XB + warp * WSLOT, o0s[st][warp], g, below);
        } else if (PROBE & 1) {
#pragma unroll
            for (int s = 0; s < 8; ++s) a[s][0] = a[s][1] = a[s][2] = a[s][3] = 0x3c003c00u ^ (u32)(lane + j);
        } else {
#pragma unroll
            for (int s = 0; s < 8; ++s) a[s][0] = a[s][1] = a[s][2] = a[s][3] = 0u;
        }
#if PROBE & 2
#pragma unroll
        for (int s = 0; s < 8; ++s) acc[s & 3] += __uint_as_float((a[s][0] ^ a[s][1] ^ a[s][2] ^ a[s][3]) & 0x3fffffffu);
#else
        wg_fence();
#pragma unroll
        for (int s = 0; s < 8; ++s) wg_mma(acc, a[s][0], a[s][1], a[s][2], a[s][3], desc_at(base, s));
        wg_commit();
#endif
    };
    u32 A0[8][4];
#if TWO
    u32 A1[8][4];
    for (int j = 0; j < cnt; j += 2) {
        step(j, A0);
        if (j + 1 < cnt) step(j + 1, A1);
    }
#else
    for (int j = 0; j < cnt; ++j) step(j, A0);
#endif
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
    asm volatile("cp.async.wait_all;\n" ::);
    // wgmma's accumulators sit as mma.m16n8k16's, per warp: acc[4j + h] is row g + 8·(h >> 1), token 8j + 2·tig + (h & 1)
    store_out(acc, part, count, y, N, nb, rb * 16, live, g, tig, blockIdx.x * WB * 16, WB * 16, &last_block);
}
"""


def _mma_fn(mt: int) -> str:
    """``wg_mma(d, a0, a1, a2, a3, db)``: d (``mt``/2 fp32 a thread) += A (64 × 16, registers) · B (16 × mt, desc)."""
    n = mt // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return ("__device__ __forceinline__ void wg_mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 db) {\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 5}, 0;\\n"\n'
            f'                 "wgmma.mma_async.sync.aligned.m64n{mt}k16.f32.bf16.bf16 {{{regs}}}, '
            f'{{%{n}, %{n + 1}, %{n + 2}, %{n + 3}}}, %{n + 4}, p, 1, 1, 0;\\n}}\\n"\n'
            f'                 : {outs}\n'
            '                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(1));\n}\n')


def source(mt: int, nwg: int = 1, nst: int = 3, cap: int = 2056, two: bool = True, probe: int = 0,
           swz: bool = False) -> str:
    """The CUDA source of ``bm_wg_bf16`` for ``mt`` tokens a pass (a multiple of 8, 8–256), ``nwg`` warpgroups a
    block (64 rows each), ``nst`` stages, a values slot of ``cap`` entries and one or two A register sets."""
    if mt % 8 or not 8 <= mt <= 256 or nwg not in (1, 2, 3, 4) or nst < (3 if two else 2) or cap % 8:
        raise ValueError(f"bm_wg_bf16: {mt} tokens a pass (a multiple of 8, 8–256), {nwg} warpgroups (1–4), "
                         f"{nst} stages (≥ 3 with two register sets, ≥ 2 with one), slot {cap} (a multiple of 8)")
    return (f"#define PROBE {probe}\n#define SWZ {int(swz)}\n#define MT {mt}\n#define NWG {nwg}\n#define NST {nst}\n#define CAP {cap}\n#define TWO {int(two)}\n"
            + SOURCE.replace("WG_MMA_FN", _mma_fn(mt)))


def smem_bytes(mt: int, nwg: int, nst: int, cap: int) -> int:
    return nst * (-(-(mt * 256 + 4 * nwg * (256 + (cap + 8) * 2)) // 1024) * 1024)


@functools.cache
def _kernel(device: int, mt: int, nwg: int, nst: int, cap: int, two: bool, probe: int = 0, swz: bool = False):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, nwg, nst, cap, two, probe, swz), "bm_wg_bf16", compute_capability="90a",
                                          nvcc_options=["--use_fast_math"])


def kernel(device: int, mt: int, nwg: int, nst: int, cap: int, two: bool, probe: int = 0, swz: bool = False):
    """The compiled ``bm_wg_bf16`` (cached per process), or ``None`` when it cannot be built here (one warning)."""
    if device in _failed:
        return None
    try:
        return _kernel(device, mt, nwg, nst, cap, two, probe, swz)
    except (RuntimeError, OSError, AttributeError, TypeError) as e:
        _failed.add(device)
        log.warning("the bitmask wgmma kernel did not compile (%s); using the mma.sync kernel",
                    str(e).splitlines()[0][:160])
        return None


def usable(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, bn: int, bk: int) -> bool:
    """A Hopper GPU (compute capability 9.0: the sm_90a code runs only there) and what the mma.sync kernel needs."""
    if not bitmask_cuda.usable(x, bitmask, values, bn, bk):
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return dev not in _failed and delta_cuda.capability(dev) == (9, 0)


def wanted(b: int, n: int, k: int) -> bool:
    """Whether the op sends ``b`` tokens of an n × k weight here rather than to the mma.sync kernel: 17–32 tokens on
    weights of 40 M or more, 33–64 on 50 M or more, where this kernel was the faster by 3–9% at 70% on the H200
    (bench/results/sparse_bitmask_wgmma_sweep_h200.json: 32 tokens 44.8 against 47.0 µs on 11008 × 4096, 170 against
    182 on 28672 × 8192; 64 tokens 193 against 212); on smaller weights and at 1–16 tokens it was not (1024 × 4096 at
    64 tokens: 67 against 26 µs). ``LAYERPRUNE_WGMMA=0`` turns it off."""
    if os.environ.get("LAYERPRUNE_WGMMA", "1") == "0":
        return False
    return (16 < b <= 32 and n * k >= 40_000_000) or (32 < b <= 64 and n * k >= 50_000_000)


def settings(n: int, k: int, b: int) -> tuple[int, int, int, bool, float, bool]:
    """(tokens a pass, warpgroups a block, stages, two register sets, blocks per SM the splits aim at, swizzle) for
    ``b`` tokens. Up to 64 tokens: 4 warpgroups (256 rows share each x stage), 4 stages, one register set, one block
    a SM, the 128-byte swizzle: the best or within 4% of the best of the sweep's 10 settings on every weight of 40 M
    or more. Past 64 (prefill) the kernel is not used by the op (0.27× of dense at 2048 tokens: BENCHMARKS.md,
    session 21); these settings are the probe's."""
    mt = next((t for t in TOKENS if t >= b), TOKENS[-1])
    if mt <= 64:
        return mt, 4, 4, False, 1.0, True
    return mt, 2, 3 if mt <= 128 else 2, mt <= 128, 1.0, True


def spmm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int,
         most: int | None = None, mt: int | None = None, nwg: int | None = None, stages: int | None = None,
         two: bool | None = None, splits: int | None = None, blocks_per_sm: float | None = None,
         probe: int = 0, swz: bool | None = None) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 with W bitmask-packed (16 × 128 tiles) by ``bm_wg_bf16``; ``None`` when
    it cannot run here (the caller falls back). Tokens go ``mt`` a block (``blockIdx.z`` past one block, then
    without column splits). Settings default to :func:`settings`; ``swz``: the 128-byte swizzle for x's stages.
    ``probe`` (timing probes only, ``bench/probe_wgmma_bitmask_parts.py``; wrong products): 1 leaves the decode out,
    2 the products, 3 both."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev in _failed or delta_cuda.capability(dev) != (9, 0):
        return None
    sms, limit = delta_cuda._props(dev)
    B = x.shape[0]
    m0, w0, s0, t0, b0, z0 = settings(n, k, B)
    mt, nwg, stages = mt or m0, nwg or w0, stages or s0
    two = t0 if two is None else two
    swz = z0 if swz is None else swz
    blocks_per_sm = blocks_per_sm or b0
    cap = bitmask_cuda.slot_for(offsets, most)
    fewest = 3 if two else 2
    # weights with full tiles (a large value slot) get fewer stages, then fewer warpgroups, to fit (the static
    # shared memory is padded to the 1024-byte alignment)
    while smem_bytes(mt, nwg, stages, cap) + 1024 + 256 > limit and (stages > fewest or nwg > 1):
        stages, nwg = (stages - 1, nwg) if stages > fewest else (stages, nwg - 1)
    smem = smem_bytes(mt, nwg, stages, cap)
    if smem + 1024 + 256 > limit:
        return None
    kern = kernel(dev, mt, nwg, stages, cap, two, probe, swz)
    if kern is None:
        return None
    x, y, done = delta_cuda.io(x, n, k)
    if done:
        return y
    kt = -(-k // 128)
    groups = -(-n // (64 * nwg))
    zb = -(-B // mt)
    if zb > 1:
        splits = 1
    elif splits is None:
        splits = max(1, min(kt, round(blocks_per_sm * sms / groups)))
    plan = bitmask_cuda.split_plan(x, kt, groups, splits, mt, n)
    if plan is None:
        return None
    cps, s, count, part = plan
    stream = delta_cuda.cur_stream(x.device.index)
    vec = int(x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
    delta_cuda._launch(kern, (groups, s, zb), 128 * nwg, smem, stream, (x, bitmask, values, offsets, part, count, y),
                       (n, k, kt, B, x.stride(0), cps, vec, values.numel()))
    return y
