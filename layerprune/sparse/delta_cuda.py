"""A CUDA kernel for the one-token product with a ``delta``-packed weight (:mod:`layerprune.sparse.delta`).

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

Compiled at first use with NVRTC through ``torch.cuda._compile_kernel`` (PyTorch ≥ 2.8; NVRTC ships with
PyTorch's CUDA wheels; PyTorch's helper also wants a CUDA toolkit's headers, ``CUDA_HOME``), so nothing is
built at install time. bf16 only. :func:`usable` says whether it can run here; :func:`delta_kernels.sparse_mm`
falls back to its Triton kernel otherwise (and when compiling fails, with one warning).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger("layerprune")

SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// PAD (zero columns past K in shared memory: padding entries' columns run past the row by < 32) and U (steps
// in flight) come from source()

__device__ __forceinline__ float bf(u32 h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ u16 to_bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

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

__device__ __forceinline__ float step_dot(const uint4* v, const u64* w, const u32* s, const u16* xs,
                                          int gb, int g1, int sub, int part) {
    const u64 LO = 0x0F0F0F0F0F0F0F0FULL, ONE = 0x0101010101010101ULL;
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const u64 p = (((w[u] >> (4 * (part >> 1))) & LO) + ONE) * ONE;
        const int tot = (int)(p >> 56);
        int c = __shfl_up_sync(0xffffffffu, tot, 1, 4);
        c = part >= 1 ? c : 0;
        const int c2 = __shfl_up_sync(0xffffffffu, c + tot, 2, 4);
        c += part >= 2 ? c2 : 0;
        const int base = (int)(s[u] & 0xFFFFu) - 1 + c;
        const u32 vv[8] = {v[u].x & 0xFFFFu, v[u].x >> 16, v[u].y & 0xFFFFu, v[u].y >> 16,
                           v[u].z & 0xFFFFu, v[u].z >> 16, v[u].w & 0xFFFFu, v[u].w >> 16};
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            a += bf(vv[j]) * bf(xs[base + (int)((p >> (8 * j)) & 0xFF)]);
        acc += gb + u * 8 + sub < g1 ? a : 0.f;
    }
    return acc;
}

extern "C" __global__ void delta_spmv_bf16(const u16* __restrict__ x, const u16* __restrict__ vals,
                                           const u64* __restrict__ dl, const u16* __restrict__ starts,
                                           const int* __restrict__ gptr, u16* __restrict__ y,
                                           int N, int K, int vec)
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
    if (vec) {
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        uint4* s4 = reinterpret_cast<uint4*>(xs);
        for (int i = tid; i < (K >> 3); i += nt) s4[i] = x4[i];
        for (int i = (K & ~7) + tid; i < K; i += nt) xs[i] = x[i];
    } else {
        for (int i = tid; i < K; i += nt) xs[i] = x[i];
    }
    for (int i = K + tid; i < K + PAD; i += nt) xs[i] = 0;
    __syncthreads();
    float acc = 0.f;
    while (r < N) {
        int gn = gb + 8 * U;
        const bool same = gn < g1;
        if (same) load_step(v2, w2, s2, vals, dl, starts, gn, g0, g1, sub, part);
        else if (rn < N && n0 < n1) load_step(v2, w2, s2, vals, dl, starts, n0, n0, n1, sub, part);
        if (gb < g1) acc += step_dot(v, w, s, xs, gb, g1, sub, part);
        if (!same) {
#pragma unroll
            for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) y[r] = to_bf(acc);
            acc = 0.f;
            r = rn; g0 = n0; g1 = n1; gn = n0;
            rn = r + nwarps;
            if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
        }
        gb = gn;
#pragma unroll
        for (int u = 0; u < U; ++u) { v[u] = v2[u]; w[u] = w2[u]; s[u] = s2[u]; }
    }
}
"""

PAD = 64
_failed: set[int] = set()


def source(unroll: int) -> str:
    """The kernel's CUDA source for ``unroll`` steps in flight."""
    return f"#define U {unroll}\n#define PAD {PAD}\n" + SOURCE


def usable(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor) -> bool:
    """Whether the kernel can take this call: a CUDA device whose kernel compiled (or can be tried), bf16, and
    buffers aligned for its vector loads (16 bytes; packed and loaded tensors are)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and values.dtype == torch.bfloat16 and torch.version.hip is None
            and hasattr(torch.cuda, "_compile_kernel") and x.device.index not in _failed
            and values.data_ptr() % 16 == 0 and deltas.data_ptr() % 16 == 0)


@functools.cache
def _kernel(device: int, unroll: int):
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(unroll), "delta_spmv_bf16", nvcc_options=["--use_fast_math"])


def kernel(device: int, unroll: int):
    """The compiled kernel for ``unroll`` steps in flight on CUDA device ``device`` (cached per process), or
    ``None`` when it cannot be compiled here (one warning; the caller uses Triton)."""
    try:
        return _kernel(device, unroll)
    except (RuntimeError, OSError, AttributeError) as e:
        _failed.add(device)
        log.warning("the one-token CUDA kernel did not compile (%s); using the Triton kernel",
                    str(e).splitlines()[0][:160])
        return None


def settings(n: int, k: int) -> tuple[int, int, int]:
    """(unroll, warps per block, blocks per SM or 0 for a warp per row) for an n × k weight: the best of
    bench/sparse_delta_cuda.py's sweep on the H200 (geometric mean over 50/70/80%; within 2% of each shape's
    best, 4096 × 4096 and 8192 × 8192 within 1%)."""
    if k > 8192:
        return 2, 16, 0
    if k == 8192:
        return 2, 8, 4
    return 2, 4, 8


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
def _sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def spmv(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, gptr: torch.Tensor,
         n: int, k: int, unroll: int | None = None, warps: int | None = None,
         per_sm: int | None = None) -> torch.Tensor | None:
    """y (1 × n) = x (1 × k) · Wᵀ in bf16 with W packed (delta layout), or ``None`` when the kernel is not
    available (the caller falls back). Settings default to :func:`settings`; ``per_sm`` 0 = a warp per row."""
    u0, w0, b0 = settings(n, k)
    unroll, warps, per_sm = unroll or u0, warps or w0, b0 if per_sm is None else per_sm
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    kern = kernel(dev, unroll)
    if kern is None:
        return None
    x = x.contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    smem = 2 * (k + PAD)
    if smem >= 48 * 1024 and getattr(kern, "_max_shared_mem_bytes", 0) < smem:
        kern.set_shared_memory_config(smem)
    grid = _sms(dev) * per_sm if per_sm else -(-n // warps)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (x, values, deltas, starts, gptr, y)]
    args += [ctypes.c_int(n), ctypes.c_int(k), ctypes.c_int(int(x.data_ptr() % 16 == 0))]
    argv = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = _launcher()(kern.func, grid, 1, 1, 32 * warps, 1, 1, smem, stream, argv, None)
    if rc != 0:
        raise RuntimeError(f"delta_cuda: cuLaunchKernel failed with CUDA error {rc}")
    return y
