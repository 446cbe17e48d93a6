"""CUDA kernels for a weight in the ``nm24`` layout (:mod:`layerprune.sparse.nm24`): the product on the sparse tensor
cores (``nm24_mma_bf16``: ``mma.sp.m16n8k32``, bf16, fp32 accumulation) for 1–64 tokens, and the dense weight
(``nm24_unpack_bf16``) for larger batches and prefills (then cuBLAS; from 1024 tokens on most shapes
:mod:`layerprune.sparse.cslt` runs cuSPARSELt instead).

The layout stores the A fragments and metadata words as the instruction takes them, so a warp loads its tiles
straight into registers: nothing is decoded, and the kernel streams the packed bytes. Measured on the H200 against
``F.linear`` on 2:4 weights of the LLaMA-2-7B / Llama-3-8B / LLaMA-2-70B shapes (BENCHMARKS.md, session 28, through
the op): one token 1.36–1.63× on the eight shapes of 4096 rows or more, 1.15× on 1024 × 4096; eight tokens
1.31–1.59×; sixteen 1.19–1.46×; 32 0.86–1.19×; 64 0.60–0.89×. Settings: :func:`settings`; which token counts come
here: ``linear.nm24_kernel_wanted``. Two ``wgmma.sp`` forms of this kernel (Hopper) were exact but no faster and
were removed (session 28).

Compiled at first use by NVRTC (``torch.cuda._compile_kernel``, as :mod:`delta_cuda`): compute capability 8.0 or
later; elsewhere :func:`usable` is false and the op unpacks with PyTorch.
"""

from __future__ import annotations

import functools
import logging

import torch

from layerprune.sparse import delta_cuda

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
    return dev not in _failed and delta_cuda.capability(dev) >= (8, 0)


def source(mt: int, mw: int = 1, wb: int = 8, uu: int = 4, ch: int = 0, minb: int = 1) -> str:
    """The CUDA source for ``mt`` tokens a pass, ``mw`` strips a warp, ``wb`` warps a block, ``uu`` tiles in flight,
    x staged ``ch`` columns at a time (0: the whole split) and registers left for ``minb`` blocks a SM."""
    return (f"#define MT {mt}\n#define MW {mw}\n#define WB {wb}\n#define UU {uu}\n#define CH {ch}\n"
            f"#define MINB {minb}\n" + SOURCE)


@functools.cache
def _kernel(device: int, name: str, mt: int, mw: int, wb: int, uu: int, ch: int = 0, minb: int = 1):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(mt, mw, wb, uu, ch, minb), name, nvcc_options=["--use_fast_math"])


def kernel(device: int, name: str, mt: int = 8, mw: int = 1, wb: int = 8, uu: int = 4, ch: int = 0, minb: int = 1):
    """The compiled kernel, or ``None`` when it cannot be compiled here (one warning; the caller unpacks)."""
    try:
        return _kernel(device, name, mt, mw, wb, uu, ch, minb)
    except (RuntimeError, OSError, AttributeError) as e:
        _failed.add(device)
        log.warning("the nm24 CUDA kernels did not compile (%s); unpacking with PyTorch", str(e).splitlines()[0][:160])
        return None


def settings(n: int, k: int, tokens: int) -> tuple[int, int, int, int, int]:
    """(m16 strips a warp, warps a block, column tiles in flight, columns of x staged at a time or 0 for the whole
    split, blocks a SM the registers leave room for), from ``bench/probe_nm24.py`` on the H200 (sessions 27, 28 and
    30, settings side by side in one run). Weights of 2048 rows or fewer: x in 256-column chunks and registers for
    four blocks a SM up to 16 tokens (1024 × 4096: 0.88 → 1.06× at one token), then four warps a block and two
    blocks a SM (1024 × 4096 at 64 tokens: 19.6 → 17.4 µs in the kernel, though ``linear.nm24_kernel_wanted`` unpacks
    that weight past 32 tokens). Up to 16 tokens: x in 512-column chunks and registers for four blocks a
    SM (one token: 1.24–1.52× → 1.34–1.60× on seven shapes of 4096–28672 rows), but on weights of 28672 columns
    two strips a warp with x staged whole (1.65× against 1.61×). 17–32 tokens (session 30, two runs within 1%):
    4096 × 4096 takes the small-weight setting (20.4 → 18.5 µs), and weights at least twice as tall as wide or of
    28672 columns two strips a warp, four warps a block, two tiles in flight (11008 × 4096: 34.5 → 32.2 µs,
    28672 × 8192: 112 → 105, 8192 × 28672: 104.5 → 100.8; on 4096 × 11008, 4096 × 14336 and 8192 × 8192 it lost
    1–21%). Otherwise 17–64 tokens as session 27 chose: x in 512-column chunks on weights of 8192 rows or more."""
    if n <= 2048:
        return (1, 8, 4, 256, 4) if tokens <= 16 else (1, 4, 4, 512, 2)
    if tokens <= 16:
        return (2, 8, 4, 0, 1) if k >= 28672 else (1, 8, 4, 512, 4)
    if tokens <= 32:
        if n <= 4096 and k <= 4096:
            return 1, 4, 4, 512, 2
        if n >= 2 * k or k >= 28672:
            return 2, 4, 2, 512, 1
    return (1, 8, 4, 512, 1) if n >= 8192 else (1, 8, 4, 0, 1)


def split_columns(k: int, tiles: int, sms: int, mt: int, ch: int = 0) -> int:
    """Columns a split (a multiple of 64, or of ``ch``): about four blocks a SM over the row groups; with the whole
    split's x staged at once (``ch`` = 0) also x within 96 KB."""
    want = max(1, round(4 * sms / tiles))
    step = ch or 64
    kc = max(step, -(-(-(-k // want)) // step) * step)
    return kc if ch else min(kc, max(64, (96 * 1024 // (2 * mt) - 8) // 64 * 64))


_plans: dict[tuple[int, int, int, int], tuple] = {}  # (device, n, k, tokens ≤ 64) → spmm's default launch settings


def _plan(dev: int, n: int, k: int, B: int, variant: tuple[int, ...] | None) -> tuple | None:
    """(kernel, tokens a pass, warps a block, columns of x staged at a time, row groups, columns a split, splits) of
    :func:`spmm`'s launches, or ``None`` when the kernel is not available."""
    mt = next((t for t in MMA_TOKENS if t >= B), MMA_TOKENS[-1])
    mw, wb, uu, ch, minb = (tuple(variant) + (0, 1)[len(variant) - 3:])[:5] if variant else settings(n, k, B)
    if ch % (32 * uu):
        raise ValueError(f"nm24: {ch} columns of x a chunk is not a multiple of 32 × {uu} tiles in flight")
    kern = kernel(dev, "nm24_mma_bf16", mt, mw, wb, uu, ch, minb)
    if kern is None:
        return None
    sms, _ = delta_cuda._props(dev)
    tiles = -(-n // (16 * mw * wb))
    kc = split_columns(k, tiles, sms, mt, ch)
    return kern, mt, wb, ch, tiles, kc, -(-k // kc)


def spmm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, k: int,
         variant: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """y (B × n) = x (B × k) · Wᵀ in bf16 on the sparse tensor cores (up to 64 tokens a pass, more in several), or
    ``None`` when the kernel is not available here. ``variant``: (strips a warp, warps a block, tiles in flight[,
    columns of x staged at a time, 0 for the whole split[, blocks a SM for the registers]]), default
    :func:`settings`."""
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    B = x.shape[0]
    key = (dev, n, k, B)
    plan = _plans.get(key) if variant is None else None
    if plan is None:
        plan = _plan(dev, n, k, B, variant)
        if plan is None:
            return None
        if variant is None and B <= 64:
            _plans[key] = plan
    kern, mt, wb, ch, tiles, kc, s = plan
    x, y, done = delta_cuda.io(x, n, k)
    if done:
        return y
    bufs = delta_cuda.split_buffers(x, dev, n, mt, tiles, s)
    if bufs is None:
        return None
    stream, count, part = bufs
    for p in range(0, B, mt):
        xp = x[p:]
        vec = int(xp.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0)
        delta_cuda._launch(kern, (tiles, s), 32 * wb, 2 * mt * ((ch or kc) + 8), stream,
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
        delta_cuda._launch(kern, (-(-tiles * 32 // 256), 1), 256, 0, delta_cuda.cur_stream(values.device.index),
                           (values, meta, out), (n, k, tiles))
    return out
