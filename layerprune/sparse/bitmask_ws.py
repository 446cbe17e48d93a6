"""Hopper (sm_90a) warp-specialised tensor-core product for a ``bitmask``-packed weight (16 × 128 tiles):
``bm_ws_bf16``, a probe of the layout that BENCHMARKS.md (session 21) named for 17–64 tokens and prefill.

The A-from-registers kernel (:mod:`layerprune.sparse.bitmask_wgmma`) makes every warp copy, decode and multiply in
turn, with a block barrier per tile. Here the roles are apart:

* 8 **producer** warps (one per 16-row block of the block's 128 rows) copy each tile's x and raw bitmask + values by
  ``cp.async`` into one of NST stages (NST − 1 tiles ahead), decode their 16 × 128 tile with the popcount decode of
  :mod:`layerprune.sparse.bitmask_cuda` (``tile_rows`` / ``slice``: the ``mma.m16n8k16`` A fragment) and store it with
  ``stmatrix`` into a decoded-A buffer (two of them) in the 128-byte swizzle, then arrive on that buffer's ``full``
  mbarrier;
* 2 **consumer** warpgroups (64 rows each) wait on ``full``, run 8 ``wgmma.m64nMTk16`` with A *and* B from shared
  memory (the "SS" form), wait for them and arrive on the tile's ``done`` mbarrier, which frees its x stage and its
  decoded-A buffer for the producers.

No block barrier inside the loop: producers run ahead of the tensor cores by a buffer. Column splits add up as in
the other tile kernels (fp32 partial sums, the last block of a row group writes y); token blocks of MT go in
``blockIdx.z``.

Compiled at first use by NVRTC for ``sm_90a``; compute capability 9.0 only (elsewhere :func:`spmm` returns ``None``).
Not used by the op: see BENCHMARKS.md (session 26) for what it measured.
"""

from __future__ import annotations

import functools
import logging

import torch

from layerprune.sparse import bitmask_cuda, bitmask_wgmma, delta_cuda

log = logging.getLogger("layerprune")

RB = 8  # 16-row blocks a block (128 rows): producer warps
NA = 2  # decoded-A buffers
_failed: set[int] = set()

SOURCE = delta_cuda.PRELUDE + bitmask_cuda.DECODE + r"""
// MT (tokens a pass), NST (stages of x and raw tiles), CAP (values slot)
#define RB 8
#define NA 2
#define NC 2  // consumer warpgroups (64 rows each)
#define NPT (RB * PW * 32)  // producer threads: PW warps a row block (PW = 2: each decodes 64 columns)
#define NCT (NC * 128)
#define VS (CAP + 8)
#define XB (MT * 256)
#define WSLOT (256 + VS * 2)
#define STAGE (((XB + RB * WSLOT) + 1023) / 1024 * 1024)
#define HALF (RB * 16 * 128)  // one 64-column half of a decoded tile (128 rows × 128 bytes)
#define AB (2 * HALF)
#define AHEAD (NST - 1)
#define SWZ 1

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int P> __device__ __forceinline__ void cp_wait_n() { asm volatile("cp.async.wait_group %0;\n" :: "n"(P)); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int P> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(P) : "memory");
}
__device__ __forceinline__ void fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
__device__ __forceinline__ u32 sa(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mb_init(u64* b, int n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(sa(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mb_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(sa(b)) : "memory");
}
__device__ __forceinline__ void mb_wait(u64* b, int parity) {
    asm volatile("{\n.reg .pred P1;\nLAB_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" :: "r"(sa(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void stsm4(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// byte offset in a stage's x of 16-byte chunk i (bitmask_wgmma's copy order and 128-byte swizzle)
__device__ __forceinline__ int xoff(int i) {
    const int t = ((i >> 7) << 3) + (i & 7), c8 = ((i >> 4) & 7) * 2 + ((i >> 3) & 1);
    return (c8 >> 3) * (MT * 128) + t * 128 + (((c8 & 7) ^ (t & 7)) << 4);
}

// a K-major operand in the 128-byte swizzle: rows of 128 bytes (64 columns), 8-row atoms 1024 bytes apart
__device__ __forceinline__ u64 desc_sw(u32 a) {
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

WG_MMA_FN

extern "C" __global__ void __launch_bounds__(NPT + NCT, 1) bm_ws_bf16(
        const u16* __restrict__ x, const u32* __restrict__ bits, const u16* __restrict__ vals,
        const int* __restrict__ offs, float* __restrict__ part, int* __restrict__ count, u16* __restrict__ y,
        int N, int K, int KT, int nb, int sxb, int CPS, int vec, int nnz)
{
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ int last_block;
    __shared__ int o0s[NST][RB];
    __shared__ __align__(8) u64 full[NA];
    __shared__ __align__(8) u64 done[NST];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
    const int r0 = blockIdx.x * RB * 16;
    const int ca = blockIdx.y * CPS, cb = min(KT, ca + CPS), cnt = cb - ca;
    x += (size_t)blockIdx.z * MT * sxb;
    y += (size_t)blockIdx.z * MT * N;
    nb = min(MT, nb - (int)blockIdx.z * MT);
    unsigned char* abuf = smem + NST * STAGE;
    if (tid == 0) {
        for (int i = 0; i < NA; ++i) mb_init(&full[i], NPT);
        for (int i = 0; i < NST; ++i) mb_init(&done[i], NCT);
    }
    // x rows past nb stay zero in every stage
    for (int st = 0; st < NST; ++st) {
        unsigned char* xt = smem + st * STAGE;
        for (int i = tid; i < MT * 16; i += NPT + NCT) {
            const int t = ((i >> 7) << 3) + (i & 7);
            if (t >= nb) *reinterpret_cast<uint4*>(xt + xoff(i)) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    fence_async();
    __syncthreads();

    float acc[MT / 2];
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) acc[i] = 0.f;
    const bool consumer = warp < 2 * 4;
    int rw = r0 + warp * 16;  // a consumer warp's first row
    bool live = consumer && rw < N;

    if (!consumer) {
        // ---- producer warp q: row block p = q / PW of the block's 128 rows, columns half·64 … (PW = 2) ----
        const int q = warp - 8, p = q / PW, half = q % PW, ptid = tid - NCT;
        const int rb = blockIdx.x * RB + p;
        const bool plive = rb * 16 < N;
        const size_t t0 = (size_t)rb * KT + ca;
        int win = 0;
        int off = plive && lane <= cnt ? offs[t0 + lane] : 0;
        const u32 below[4] = {(1u << (2 * tig)) - 1u, (1u << (2 * tig + 8)) - 1u, (1u << (2 * tig + 16)) - 1u,
                              (1u << (2 * tig + 24)) - 1u};
        auto issue = [&](int j) {
            const int st = j % NST;
            unsigned char* base = smem + st * STAGE;
            const int c0 = (ca + j) * 128;
            for (int i = ptid; i < MT * 16; i += NPT) {
                const int t = ((i >> 7) << 3) + (i & 7), c8 = ((i >> 4) & 7) * 2 + ((i >> 3) & 1), col = c0 + c8 * 8;
                if (t < nb) x_chunk(reinterpret_cast<u16*>(base + xoff(i)), x + (size_t)t * sxb + col, col, K, vec);
            }
            int o0, o1;
            tile_offsets(offs, t0, j, cnt, plive, lane, win, off, o0, o1);
            if (lane == 0 && half == 0) o0s[st][p] = o0;
            if (plive && half == 0) stage_tile(base + XB + p * WSLOT, bits, vals, t0 + j, o0, o1, nnz, lane);
        };
        // stmatrix: lane L gives row (L & 7) + 8·((L >> 3) & 1) of the warp's 16 rows, chunk 2s + (L >> 4)
        const int mrow = 16 * p + (lane & 7) + 8 * ((lane >> 3) & 1), mhi = lane >> 4;
#pragma unroll
        for (int j = 0; j < AHEAD; ++j) {
            if (j < cnt) issue(j);
            cp_commit();
        }
        for (int j = 0; j < cnt; ++j) {
            cp_wait_n<AHEAD - 1>();  // tile j's copies of this thread landed
            fence_async();
            if (PW == 1) __syncwarp();
            else asm volatile("bar.sync %0, %1;\n" :: "r"(1 + p), "n"(32 * PW) : "memory");  // the row block's warps
            if (j >= NA) mb_wait(&done[(j - NA) % NST], ((j - NA) / NST) & 1);  // its A buffer is free
            const int st = j % NST;
            const u32 ab = sa(abuf + (j % NA) * AB);
            if (plive && !(PROBE & 1)) {
                const Rows rows = tile_rows(smem + st * STAGE + XB + p * WSLOT, o0s[st][p], g);
#pragma unroll
                for (int s = 0; s < 8; ++s) {
                    if (PW == 2 && (s >> 2) != half) continue;  // unrolled: the rows' words stay in registers
                    u32 a0, a1, a2, a3;
                    slice(rows, below, tig, s, a0, a1, a2, a3);
                    const int c = 2 * s + mhi;
                    stsm4(ab + (c >> 3) * HALF + mrow * 128 + (((c & 7) ^ (lane & 7)) << 4), a0, a1, a2, a3);
                }
            }
            fence_async();
            mb_arrive(&full[j % NA]);
            const int jn = j + AHEAD;
            if (jn < cnt) {
                if (jn >= NST) mb_wait(&done[(jn - NST) % NST], ((jn - NST) / NST) & 1);  // its stage is free
                __syncwarp();
                issue(jn);
            }
            cp_commit();
        }
        asm volatile("cp.async.wait_all;\n" ::);
    } else {
        // ---- consumer warpgroup c: rows 64c … 64c + 63 ----
        const int c = warp >> 2;
        for (int j = 0; j < cnt; ++j) {
            mb_wait(&full[j % NA], (j / NA) & 1);
            const u32 ab = sa(abuf + (j % NA) * AB) + c * 64 * 128;
            const u32 xb = sa(smem + (j % NST) * STAGE);
#if !(PROBE & 2)
            wg_fence();
#pragma unroll
            for (int s = 0; s < 8; ++s)
                wg_mma(acc, desc_sw(ab + (s >> 2) * HALF + (s & 3) * 32), desc_sw(xb + (s >> 2) * (MT * 128) + (s & 3) * 32));
            wg_commit();
            if (CW) wg_wait<1>(); else wg_wait<0>();
#endif
#pragma unroll
            for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
            if (!CW) mb_arrive(&done[j % NST]);
            else if (j > 0) mb_arrive(&done[(j - 1) % NST]);  // CW: tile j − 1's products are done
        }
        wg_wait<0>();
#pragma unroll
        for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
    }
    // wgmma's accumulators sit as mma.m16n8k16's, per warp: acc[4j + h] is row g + 8·(h >> 1), token 8j + 2·tig + (h & 1)
    store_out(acc, part, count, y, N, nb, rw, live, g, tig, r0, RB * 16, &last_block);
}
"""


def _mma_fn(mt: int) -> str:
    """``wg_mma(d, da, db)``: d (``mt``/2 fp32 a thread) += A (64 × 16, desc) · B (16 × mt, desc), both K-major."""
    n = mt // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return ("__device__ __forceinline__ void wg_mma(float* d, u64 da, u64 db) {\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 2}, 0;\\n"\n'
            f'                 "wgmma.mma_async.sync.aligned.m64n{mt}k16.f32.bf16.bf16 {{{regs}}}, '
            f'%{n}, %{n + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
            f'                 : {outs}\n'
            '                 : "l"(da), "l"(db), "r"(1));\n}\n')


def source(mt: int, nst: int = 4, cap: int = 768, probe: int = 0, pw: int = 1, cw: bool = False) -> str:
    """The CUDA source of ``bm_ws_bf16`` for ``mt`` tokens a pass (a multiple of 8, 8–256), ``nst`` stages (≥ 3) and
    a values slot of ``cap`` entries; ``pw`` producer warps a row block (2: each decodes 64 columns); ``cw``: the
    consumers keep one tile's products in flight (``wgmma.wait_group 1``). ``probe`` (timing only, wrong products): 1
    no decode, 2 no products, 3 neither."""
    if mt % 8 or not 8 <= mt <= 256 or nst < 3 or cap % 8 or pw not in (1, 2) or (pw == 2 and mt > 64):
        raise ValueError(f"bm_ws_bf16: {mt} tokens a pass (a multiple of 8, 8–256), {nst} stages (≥ 3), "
                         f"slot {cap} (a multiple of 8), {pw} producer warps a row block (1, or 2 up to 64 tokens)")
    return (f"#define PROBE {probe}\n#define PW {pw}\n#define CW {int(cw)}\n#define MT {mt}\n#define NST {nst}\n#define CAP {cap}\n"
            + SOURCE.replace("WG_MMA_FN", _mma_fn(mt)))


def smem_bytes(mt: int, nst: int, cap: int) -> int:
    stage = -(-(mt * 256 + RB * (256 + (cap + 8) * 2)) // 1024) * 1024
    return nst * stage + NA * RB * 16 * 256


@functools.cache
def _kernel(device: int, mt: int, nst: int, cap: int, probe: int = 0, pw: int = 1, cw: bool = False):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, nst, cap, probe, pw, cw), "bm_ws_bf16", compute_capability="90a",
                                          nvcc_options=["--use_fast_math"])


def kernel(device: int, mt: int, nst: int, cap: int, probe: int = 0, pw: int = 1, cw: bool = False):
    """The compiled ``bm_ws_bf16`` (cached per process), or ``None`` when it cannot be built here (one warning)."""
    if device in _failed:
        return None
    try:
        return _kernel(device, mt, nst, cap, probe, pw, cw)
    except (RuntimeError, OSError, AttributeError, TypeError) as e:
        _failed.add(device)
        log.warning("the warp-specialised bitmask kernel did not compile (%s)", str(e).splitlines()[0][:160])
        return None


def spmm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, n: int, k: int,
         most: int | None = None, mt: int | None = None, stages: int = 4, splits: int | None = None,
         blocks_per_sm: float = 1.0, probe: int = 0, pw: int = 1, cw: bool = False) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 with W bitmask-packed (16 × 128 tiles) by ``bm_ws_bf16``; ``None`` when
    it cannot run here. Tokens go ``mt`` a block (default: the smallest of :data:`bitmask_wgmma.TOKENS` that holds
    them, at most 128; fewer where a large value slot leaves no room; ``blockIdx.z`` past one block, then without
    column splits)."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev in _failed or torch.cuda.get_device_capability(dev) != (9, 0):
        return None
    sms, limit = delta_cuda._props(dev)
    B = x.shape[0]
    mt = mt or next((t for t in bitmask_wgmma.TOKENS if t >= B), 128)
    if pw == 2:
        mt = min(mt, 64)
    cap = bitmask_cuda.slot_for(offsets, most)
    # a large value slot (full tiles) gets fewer stages, then fewer tokens a block
    while smem_bytes(mt, stages, cap) + 1024 + 512 > limit and (stages > 3 or mt > 8):
        stages, mt = (stages - 1, mt) if stages > 3 else (stages, max(t for t in bitmask_wgmma.TOKENS if t < mt))
    smem = smem_bytes(mt, stages, cap)
    if smem + 1024 + 512 > limit:
        return None
    kern = kernel(dev, mt, stages, cap, probe, pw, cw)
    if kern is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if n == 0 or B == 0 or k == 0:
        return y.zero_()
    kt = -(-k // 128)
    groups = -(-n // (16 * RB))
    zb = -(-B // mt)
    if zb > 1:
        splits = 1
    elif splits is None:
        splits = max(1, min(kt, round(blocks_per_sm * sms / groups)))
    plan = bitmask_cuda.split_plan(x, kt, groups, splits, mt, n)
    if plan is None:
        return None
    cps, s, count, part = plan
    stream = torch.cuda.current_stream(x.device).cuda_stream
    vec = int(x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
    delta_cuda._launch(kern, (groups, s, zb), 32 * RB * pw + 128 * 2, smem, stream,
                       (x, bitmask, values, offsets, part, count, y), (n, k, kt, B, x.stride(0), cps, vec, values.numel()))
    return y
