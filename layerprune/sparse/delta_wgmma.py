"""Hopper (sm_90a) tensor-core product for a ``delta``-packed weight and 9–64 tokens: ``delta_wg_bf16``.

The same decode as :mod:`delta_cuda`'s tile kernel (a chunk index per row and chunk of columns, a warp lists its
16 rows' groups for the chunk and stores their entries into a tile in shared memory, four lanes a group), but the
products run on ``wgmma`` (the warpgroup-wide asynchronous tensor-core instruction of Hopper) instead of
``mma.sync``:

* A block is one warpgroup (4 warps) and owns 64 rows. Each warp decodes its 16 rows of the chunk into the
  block's 64 × ``KC`` tile; the warpgroup then issues ``KC``/16 ``wgmma.m64nMTk16`` that read that tile (A) and
  the chunk of x (B, ``MT`` tokens) straight from shared memory. The mma.sync kernel read every x fragment
  once per warp (16 rows): here once per 64 rows. Nsight Compute had put that kernel's limit on the
  shared-memory pipe (BENCHMARKS.md, session 16).
* Two stages: while the tensor cores run chunk c (``wgmma`` is asynchronous), the warps decode chunk c + 1 into
  the other tile and ``cp.async`` brings its x. ``wgmma.wait_group 1`` before a stage is written again.
* Both tiles are in the no-swizzle "core matrix" layout: 8 rows × 16 bytes contiguous, the ``KC``/8 core matrices
  of 8 rows one after another (leading byte offset 128, the step along K), 8-row groups ``KC``·16 bytes apart
  (stride byte offset). Written by ordinary stores, so each writer fences the async proxy
  (``fence.proxy.async.shared::cta``) before the barrier that precedes the ``wgmma``.
* Splits of the columns over ``blockIdx.y`` add up as in the tile kernel: fp32 partial sums, the last block of a
  row tile (a counter, reset by that block) writes y.

Compiled at first use by NVRTC for ``sm_90a`` (``wgmma`` exists only there), so it runs on compute capability
9.0 only; elsewhere :func:`spmm_wg` returns ``None`` and the caller keeps the mma.sync kernel.
"""

from __future__ import annotations

import functools
import logging

import torch

from layerprune.sparse import delta_cuda

log = logging.getLogger("layerprune")

KC = 128  # columns per chunk
ROWS = 64  # rows per block (one warpgroup: 4 warps × 16)
MMA_TOKENS = (16, 32, 64)  # tokens per pass (the wgmma's n)
_failed: set[int] = set()

WG_SOURCE = r"""
// ---- delta_wg_bf16 (sm_90a): a warpgroup per 64 rows, wgmma on tiles decoded in shared memory. KC, MT, U from
// the defines; LBO / SBO: the descriptors' byte offsets (leading: the next core matrix along K; stride: the next
// 8-row group).
#define WROWS (64 * NWG)  // rows of a block: NWG warpgroups of 64
#define STAGE ((WROWS + MT) * KC)  // elements of one stage: the W tile, then the x tile

// element index of (r, c) in a core-matrix tile of KC columns
__device__ __forceinline__ int cm(int r, int c) { return (r >> 3) * (KC * 8) + (c >> 3) * 64 + (r & 7) * 8 + (c & 7); }

__device__ __forceinline__ u64 wg_desc(const u16* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)((LBO & 0x3FFFF) >> 4) << 16) | ((u64)((SBO & 0x3FFFF) >> 4) << 32);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int P> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(P) : "memory");
}
__device__ __forceinline__ void fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keeps the compiler from moving accumulator reads across a wait
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r) :: "memory"); }

WG_MMA_FN

// the entries of U steps into the tile (row rb + the item's row): columns outside [c0, c0 + KC) are left out
__device__ __forceinline__ void store_cm(u16* wt, const uint4* v, const u64* w, const u32* s, int b, int total,
                                         int sub, int q, int c0, int rb) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        u64 p;
        const int base = quarter(w[u], s[u], q, p) - c0;
        if (b + u * 8 + sub < total) {
            const u32 vv[8] = {v[u].x & 0xFFFFu, v[u].x >> 16, v[u].y & 0xFFFFu, v[u].y >> 16,
                               v[u].z & 0xFFFFu, v[u].z >> 16, v[u].w & 0xFFFFu, v[u].w >> 16};
            const int r = rb + (int)(s[u] >> 16);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int col = base + (int)((p >> (8 * j)) & 0xFF);
                if ((unsigned)col < (unsigned)KC) wt[cm(r, col)] = (u16)vv[j];
            }
        }
    }
}

// x[MT tokens × KC columns from c0] into a core-matrix tile (tokens past nb, columns past K: zeros)
__device__ __forceinline__ void load_x(u16* xt, const u16* __restrict__ x, int c0, int K, int nb, int sxb, int vec,
                                       int tid) {
    for (int idx = tid; idx < MT * (KC / 8); idx += 128 * NWG) {
        const int t = idx / (KC / 8), c8 = idx % (KC / 8), col = c0 + c8 * 8;
        u16* dst = xt + (t >> 3) * (KC * 8) + c8 * 64 + (t & 7) * 8;
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

// a warp's 16 rows of one chunk: zero them, then store the listed groups' entries
__device__ __forceinline__ void decode_chunk(u16* wt, const u16* __restrict__ vals, const u64* __restrict__ dl,
                                             const u16* __restrict__ starts, const int* pre, const int* first,
                                             const unsigned char* rows, int total, int lane, int sub, int q,
                                             int c0, int rb, uint4* v, u64* w, u32* s) {
    uint4* z = reinterpret_cast<uint4*>(wt + (rb >> 3) * (KC * 8));
    for (int i = lane; i < 2 * KC; i += 32) z[i] = make_uint4(0u, 0u, 0u, 0u);
    __syncwarp();
    for (int bb = 0; bb < total; bb += 8 * U) {  // the first step's loads were requested before
        if (bb) load_items(v, w, s, vals, dl, starts, pre, first, rows, bb, total, sub, q);
        store_cm(wt, v, w, s, bb, total, sub, q, c0, rb);
    }
}

extern "C" __global__ void __launch_bounds__(128 * NWG) delta_wg_bf16(
        const u16* __restrict__ x, const u16* __restrict__ vals, const u64* __restrict__ dl,
        const u16* __restrict__ starts, const int* __restrict__ cidx, float* __restrict__ part,
        int* __restrict__ count, u16* __restrict__ y, int N, int K, int nb, int sxb, int CPS, int NCH, int vec)
{
    extern __shared__ __align__(128) u16 smw[];
    __shared__ int pre[4 * NWG][16], first[4 * NWG][16];
    __shared__ unsigned char rows[4 * NWG][16 * ((KC + 31) / 32 + 2)];
    __shared__ int last_block;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, sub = lane >> 2, q = lane & 3;
    const int r0 = blockIdx.x * WROWS, rb = warp * 16, rw = r0 + rb;
    const int ca = blockIdx.y * CPS, cb = min(NCH, ca + CPS);
    // lane i < 16: row rw + i's groups for the current chunk are [a, min(b + 1, e))
    const bool live = lane < 16 && rw + lane < N;
    const int* ci = cidx + (size_t)(rw + lane) * (NCH + 1);
    int a = 0, b = 0, e = 0;
    if (live) { a = ci[ca]; b = ci[ca + 1]; e = ci[NCH]; }
    uint4 v[U];
    u64 w[U];
    u32 s[U];
    float acc[MT / 2];
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) acc[i] = 0.f;
    // chunk ca into stage 0
    load_x(smw + WROWS * KC, x, ca * KC, K, nb, sxb, vec, tid);
    int total = make_list(live ? min(b + 1, e) - a : 0, a, lane, pre[warp], first[warp], rows[warp]);
    if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);
    decode_chunk(smw, vals, dl, starts, pre[warp], first[warp], rows[warp], total, lane, sub, q, ca * KC, rb, v, w, s);
    cp_wait();
    fence_async();
    __syncthreads();
    for (int c = ca; c < cb; ++c) {
        const int st = STAGES == 1 ? 0 : (c - ca) & 1;
        int bn = 0;
        if (live && c + 2 <= NCH) bn = ci[c + 2];
        const u16* wt = smw + st * STAGE;
        const u16* xt = wt + WROWS * KC;
#pragma unroll
        for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < KC / 16; ++kk)
            wg_mma(acc, wg_desc(wt + (warp >> 2) * 64 * KC + kk * 128), wg_desc(xt + kk * 128));
        wg_commit();
        if (c + 1 < cb) {  // chunk c + 1 into the other stage while the tensor cores run chunk c (one stage: after)
            wg_wait<STAGES - 1>();  // the last readers of that stage are done
#pragma unroll
            for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
            __syncthreads();
            u16* wn = smw + (STAGES == 1 ? 0 : st ^ 1) * STAGE;
            load_x(wn + WROWS * KC, x, (c + 1) * KC, K, nb, sxb, vec, tid);
            a = b;
            b = bn;
            total = make_list(live ? min(b + 1, e) - a : 0, a, lane, pre[warp], first[warp], rows[warp]);
            if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);
            decode_chunk(wn, vals, dl, starts, pre[warp], first[warp], rows[warp], total, lane, sub, q, (c + 1) * KC,
                         rb, v, w, s);
            cp_wait();
            fence_async();
            __syncthreads();
        }
    }
    wg_wait<0>();
#pragma unroll
    for (int i = 0; i < MT / 2; ++i) pin(acc[i]);
    // accumulator i = 4j + h: row rw + lane/4 + 8·(h >> 1), token 8j + 2·(lane % 4) + (h & 1)
    float* out = part + (size_t)blockIdx.y * nb * N;
    const bool one = gridDim.y == 1;
    const int fg = lane >> 2, ft = lane & 3;
#pragma unroll
    for (int j = 0; j < MT / 8; ++j)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            const int tk = j * 8 + 2 * ft + (h & 1), rr = rw + fg + 8 * (h >> 1);
            if (tk < nb && rr < N) {
                if (one) y[(size_t)tk * N + rr] = to_bf(acc[4 * j + h]);
                else out[(size_t)tk * N + rr] = acc[4 * j + h];
            }
        }
    if (one) return;
    __threadfence();
    __syncthreads();
    if (tid == 0) last_block = atomicAdd(count + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    for (int idx = tid; idx < nb * WROWS; idx += 128 * NWG) {
        const int tk = idx / WROWS, rr = r0 + idx % WROWS;
        if (rr >= N) continue;
        float sum = 0.f;
        for (int sp = 0; sp < (int)gridDim.y; ++sp) sum += __ldcg(part + ((size_t)sp * nb + tk) * N + rr);
        y[(size_t)tk * N + rr] = to_bf(sum);
    }
    if (tid == 0) count[blockIdx.x] = 0;  // ready for the next launch
}
"""


def _mma_fn(mt: int) -> str:
    """``wg_mma(acc, da, db)``: acc (``mt``/2 fp32 a thread) += A (64 × 16, descriptor da) · B (16 × mt, db)ᵀ."""
    n = mt // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return ("__device__ __forceinline__ void wg_mma(float* d, u64 da, u64 db) {\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 2}, 0;\\n"\n'
            f'                 "wgmma.mma_async.sync.aligned.m64n{mt}k16.f32.bf16.bf16 {{{regs}}}, %{n}, %{n + 1}, '
            f'p, 1, 1, 0, 0;\\n}}\\n"\n'
            f'                 : {outs}\n'
            '                 : "l"(da), "l"(db), "r"(1));\n}\n')


def source(mt: int, unroll: int = 4, kc: int = KC, nwg: int = 1, stages: int = 2, swap: bool = False) -> str:
    """The CUDA source of ``delta_wg_bf16`` for ``mt`` tokens a pass (a multiple of 8 up to 256), ``unroll`` steps
    in flight, chunks of ``kc`` columns, ``nwg`` warpgroups a block (64 rows each, one x tile) and ``stages``
    (1: decode, then the products; 2: the next chunk decoded while the tensor cores run); ``swap`` exchanges the
    descriptors' two byte offsets (a check of the layout: it must give wrong products)."""
    if mt % 8 or not 8 <= mt <= 256 or kc % 16 or kc < 16 or nwg not in (1, 2, 3, 4) or stages not in (1, 2):
        raise ValueError(f"delta_wg_bf16: {mt} tokens a pass (a multiple of 8, 8–256), chunk {kc} (a multiple of "
                         f"16), {nwg} warpgroups (1–4), {stages} stages (1 or 2)")
    lbo, sbo = 128, kc * 16
    if swap:
        lbo, sbo = sbo, lbo
    base = delta_cuda.source(unroll, 1, 16, (4, 1, kc))
    return (base + f"#undef MT\n#define MT {mt}\n#define LBO {lbo}\n#define SBO {sbo}\n#define NWG {nwg}\n"
            f"#define STAGES {stages}\n" + WG_SOURCE.replace("WG_MMA_FN", _mma_fn(mt)))


def smem_bytes(mt: int, kc: int = KC, nwg: int = 1, stages: int = 2) -> int:
    """Dynamic shared memory of a block: ``stages`` × (the 64·nwg × kc W tile and the mt × kc x tile), bf16."""
    return stages * 2 * (ROWS * nwg + mt) * kc


@functools.cache
def _kernel(device: int, mt: int, unroll: int, kc: int, nwg: int, stages: int, swap: bool):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, unroll, kc, nwg, stages, swap), "delta_wg_bf16",
                                          compute_capability="90a", nvcc_options=["--use_fast_math"])


def kernel(device: int, mt: int, unroll: int = 4, kc: int = KC, nwg: int = 1, stages: int = 2, swap: bool = False):
    """The compiled ``delta_wg_bf16`` (cached per process), or ``None`` when it cannot be built here (one
    warning)."""
    if device in _failed:
        return None
    try:
        return _kernel(device, mt, unroll, kc, nwg, stages, swap)
    except (RuntimeError, OSError, AttributeError, TypeError) as e:
        _failed.add(device)
        log.warning("the wgmma kernel did not compile (%s); using the mma.sync kernel", str(e).splitlines()[0][:160])
        return None


def usable(x: torch.Tensor) -> bool:
    """A Hopper GPU (compute capability 9.0: the sm_90a code runs there only) whose kernel has not failed."""
    if not x.is_cuda or torch.version.hip is not None:
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return dev not in _failed and torch.cuda.get_device_capability(dev) == (9, 0)


def splits_for(n: int, nch: int, sms: int, per_sm: int = 3, rows: int = ROWS) -> int:
    """Column splits: about ``per_sm`` blocks per SM over the tiles of ``rows`` rows, at most one chunk a split."""
    return max(1, min(nch, round(per_sm * sms / -(-n // rows))))


def spmm_wg(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, cidx: torch.Tensor,
            n: int, k: int, splits: int | None = None, kc: int = KC, unroll: int = 4, mt: int | None = None,
            nwg: int = 1, stages: int = 2, swap: bool = False) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 by ``delta_wg_bf16`` (``mt`` tokens a pass, default the smallest of
    ``MMA_TOKENS`` that holds B, else 64 and several passes), with ``cidx`` = ``delta_cuda.chunk_index`` for chunks
    of ``kc``; ``None`` when the kernel cannot run here."""
    if not usable(x):
        return None
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    nch = -(-k // kc)
    if cidx.shape != (n, nch + 1):
        raise ValueError(f"spmm_wg: the chunk index has shape {tuple(cidx.shape)}, not {(n, nch + 1)} for chunk {kc}")
    B = x.shape[0]
    mt = mt or next((t for t in MMA_TOKENS if t >= B), MMA_TOKENS[-1])
    sms, limit = delta_cuda._props(dev)
    smem = smem_bytes(mt, kc, nwg, stages)
    if smem + 4 * nwg * 16 * (8 + -(-kc // 32) + 2) + 4 > limit:
        return None
    kern = kernel(dev, mt, unroll, kc, nwg, stages, swap)
    if kern is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(B, n, dtype=x.dtype, device=x.device)
    if n == 0 or B == 0:
        return y.zero_()
    rows = ROWS * nwg
    tiles = -(-n // rows)
    cps = -(-nch // (splits or splits_for(n, nch, sms, rows=rows)))
    s = -(-nch // cps)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    count = delta_cuda._counters(dev, stream)
    if s > 1 and tiles > count.numel():
        return None
    part = torch.empty(s, mt, n, dtype=torch.float32, device=x.device) if s > 1 else count
    for p in range(0, B, mt):
        xp = x[p:]
        vec = int(xp.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
        delta_cuda._launch(kern, (tiles, s), 128 * nwg, smem, stream,
                           (xp, values, deltas, starts, cidx, part, count, y[p:]),
                           (n, k, min(mt, B - p), x.stride(0), cps, nch, vec))
    return y
