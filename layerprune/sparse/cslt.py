"""2:4 products at prefill sizes on the sparse tensor cores through cuSPARSELt, from a weight in the ``nm24`` layout.

PyTorch ships cuSPARSELt (``torch._cslt_sparse_mm``), but its op builds and destroys the cuSPARSELt plan on every
call: hundreds of µs of host time (session 28, 2048 tokens: eager 0.08–1.27× of dense, replayed from a CUDA graph
1.24–1.47× on five of eight shapes). Here the library is called through ``ctypes`` with one plan kept per
(device, rows, columns, token bucket) (:class:`_Plans`, least recently used dropped past ``PLANS``), the algorithm
searched once when the plan is made (``cusparseLtMatmulSearch``, as ``torch._cslt_sparse_mm_search``).

The weight stays in the nm24 layout (the decode kernels read it); each call rewrites it in cuSPARSELt's compressed
layout (:data:`CONVERT`, one CUDA kernel, ``n·k·9/8`` bytes written) and multiplies. cuSPARSELt 0.8.0's layout on the
H200 (values row-major, then one 4-bit code a group of four at :func:`nibble`) was read off its own compressions
(``bench/probe_24prefill.py --read``) and the conversion checked byte for byte against ``torch._cslt_compress`` at
the ten LLaMA shapes probed, stacked q/k/v and gate/up included (session 29); :func:`layout_ok` checks it once a
device before the first product and keeps the path off where it differs. Which token counts come here:
``linear.nm24_cslt_wanted``; a call's host time (the ctypes arguments made once a plan) is why 512-token prefills do
not.

Descriptors as ``torch._cslt_sparse_mm`` makes them: A (n × k, 2:4, row-major), B = x (b × k row-major, transposed
by the op), D (n × b column-major, i.e. y as b × n row-major), bf16 in and out, fp32 compute.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import sys
import threading
from collections import OrderedDict

import torch

from layerprune.sparse import delta_cuda

log = logging.getLogger("layerprune")

PLANS = 64  # plans kept (one per device, weight shape and token bucket), least recently used dropped
BUCKET = 128  # token counts are padded up to a multiple of this: cuSPARSELt refused 1, 100 and 300 tokens (status 10,
# session 29; counts in multiples of 128 were all taken), and fewer distinct counts make fewer plans
SEARCH = True  # search each new plan's algorithm (cusparseLtMatmulSearch) rather than take the default
ENABLED = os.environ.get("LAYERPRUNE_CUSPARSELT", "1") != "0"  # LAYERPRUNE_CUSPARSELT=0: 2:4 prefills unpack instead
_OPAQUE = 4096  # bytes for each opaque cuSPARSELt struct (512 in 0.10's header; room to spare for other releases)
_BF16, _ROW, _COL, _NON_T, _T, _COMPUTE_32F = 14, 2, 1, 0, 1, 2  # cudaDataType, cusparseOrder_t, ops, compute type


def nibble(r, g, groups):
    """The nibble (4-bit index into the metadata) of row r's group of four g, ``groups`` = k/4 a row (ints or
    integer tensors): 64-row × 8-group blocks of 256 bytes, a row band's blocks in column order; inside a block bit 0
    = bit 3 of r, bit 1 = bit 2 of g, bits 2-3 = g mod 4, bits 4-6 = r mod 8, bits 7-8 = bits 4-5 of r."""
    inside = ((r >> 3) & 1) | (((g >> 2) & 1) << 1) | ((g & 3) << 2) | ((r & 7) << 4) | (((r >> 4) & 3) << 7)
    return inside + (g >> 3) * 512 + (r >> 6) * 64 * groups


CONVERT = r"""
typedef unsigned int u32;
__device__ __forceinline__ size_t nib(int r, int g, int G) {  // nibble() in Python
    return (size_t)(((r >> 3) & 1) | (((g >> 2) & 1) << 1) | ((g & 3) << 2) | ((r & 7) << 4) | (((r >> 4) & 3) << 7)
                    | ((g >> 3) << 9)) + (size_t)(r >> 6) * 64 * G;
}
// An nm24 weight (N a multiple of 64) in cuSPARSELt's layout: thread (tile, lane) moves the four value pairs of its
// A fragment (groups t and t + 4 of rows g and g + 8) and writes the two metadata bytes those groups make (a byte holds
// rows r and r + 8 of one group).
extern "C" __global__ void nm24_to_cslt(const uint4* __restrict__ vals, const u32* __restrict__ meta,
                                        u32* __restrict__ outv, unsigned char* __restrict__ outm, int N, int K,
                                        int tiles) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tiles * 32) return;
    const int tile = i >> 5, lane = i & 31, g = lane >> 2, t = lane & 3, KT = K >> 5, G = K >> 2;
    const int r0 = (tile / KT) * 16 + g, tc = tile % KT;
    const uint4 v = vals[i];
    const u32 pv[4] = {v.x, v.y, v.z, v.w};
    const u32 m0 = meta[(size_t)tile * 16 + 2 * g], m1 = meta[(size_t)tile * 16 + 2 * g + 1];
    const u32 pm[4] = {m0, m0 >> 16, m1, m1 >> 16};
#pragma unroll
    for (int q = 0; q < 4; ++q)
        outv[(size_t)(r0 + 8 * (q & 1)) * (K >> 2) + tc * 8 + t + 4 * (q >> 1)] = pv[q];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 lo = (pm[2 * h] >> (4 * t)) & 15u, hi = (pm[2 * h + 1] >> (4 * t)) & 15u;
        outm[nib(r0, tc * 8 + t + 4 * h, G) >> 1] = (unsigned char)(lo | (hi << 4));
    }
}
"""


def fits(n: int, k: int) -> bool:
    """Whether an n × k nm24 weight can take this path: the layout's 64-row bands, and k a multiple of 128 (at k = 96
    cuSPARSELt's compressed bytes differed from :data:`CONVERT`'s and ended in zeros, a padded layout by the look of
    it; multiples of 64 were not tried; every LLaMA shape is a multiple of 128)."""
    return n > 0 and k > 0 and n % 64 == 0 and k % 128 == 0


@functools.cache
def _lib():
    """libcusparseLt (the one PyTorch loaded, else the first on ``sys.path``'s ``nvidia/`` folders), or ``None``."""
    names = ["libcusparseLt.so.0", "libcusparseLt.so"]
    for p in sys.path:
        names += sorted(glob.glob(os.path.join(p, "nvidia", "**", "libcusparseLt.so*"), recursive=True))
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            for f in (lib.cusparseLtMatmul, lib.cusparseLtMatmulSearch):
                f.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int32]
                f.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


_warned = False


def _warn(msg: str, *args) -> None:
    """The first refusal or failure as a warning, later ones at debug level (one for every shape would repeat)."""
    global _warned
    (log.debug if _warned else log.warning)(msg, *args)
    _warned = True


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"cuSPARSELt: {what} failed with status {rc}")


def _buf():
    return ctypes.create_string_buffer(_OPAQUE)


@functools.cache
def _handle(device: int):
    lib = _lib()
    h = _buf()
    with torch.cuda.device(device):
        _check(lib.cusparseLtInit(h), "init")
    return h


class _Plan:
    """A cuSPARSELt plan for y (b × n) = x (b × k) · Wᵀ, its descriptors and its workspace size."""

    def __init__(self, device: int, n: int, k: int, b: int, search: bool = True):
        lib, h = _lib(), _handle(device)
        i64, u32, c = ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
        self.lib, self.h = lib, h
        self.a, self.b, self.d, self.mm, self.alg, self.plan = (_buf() for _ in range(6))
        self.made = []
        _check(lib.cusparseLtStructuredDescriptorInit(h, self.a, i64(n), i64(k), i64(k), u32(16), c(_BF16), c(_ROW),
                                                      c(0)), "the weight's descriptor")
        self.made.append(("desc", self.a))
        _check(lib.cusparseLtDenseDescriptorInit(h, self.b, i64(b), i64(k), i64(k), u32(16), c(_BF16), c(_ROW)),
               "the input's descriptor")
        self.made.append(("desc", self.b))
        _check(lib.cusparseLtDenseDescriptorInit(h, self.d, i64(n), i64(b), i64(n), u32(16), c(_BF16), c(_COL)),
               "the output's descriptor")
        self.made.append(("desc", self.d))
        _check(lib.cusparseLtMatmulDescriptorInit(h, self.mm, c(_NON_T), c(_T), self.a, self.b, self.d, self.d,
                                                  c(_COMPUTE_32F)), "the product's descriptor")
        _check(lib.cusparseLtMatmulAlgSelectionInit(h, self.alg, self.mm, c(0)), "the algorithm selection")
        self.made.append(("alg", self.alg))
        _check(lib.cusparseLtMatmulPlanInit(h, self.plan, self.mm, self.alg), "the plan")
        self.made.append(("plan", self.plan))
        ws = ctypes.c_size_t(0)
        _check(lib.cusparseLtMatmulGetWorkspace(h, self.plan, ctypes.byref(ws)), "the workspace size")
        self.workspace = ws.value
        self.searched = not search
        # the product's host-side arguments, made once (host time counts in an eager prefill)
        self._alpha, self._beta, self._stream = ctypes.c_float(1.0), ctypes.c_float(0.0), ctypes.c_void_p(0)
        addr = ctypes.addressof
        self._args = (addr(h), addr(self.plan), addr(self._alpha), addr(self._beta), addr(self._stream))

    def search(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Search the algorithm (the plan keeps the fastest), then size the workspace again for it."""
        self.run(a, x, y, search=True)
        ws = ctypes.c_size_t(0)
        _check(self.lib.cusparseLtMatmulGetWorkspace(self.h, self.plan, ctypes.byref(ws)), "the workspace size")
        self.workspace = max(self.workspace, ws.value)
        self.searched = True

    def run(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, search: bool = False) -> None:
        """The product (or the search) on the current stream (the argument types declared in :func:`_lib`)."""
        ws = torch.empty(self.workspace, dtype=torch.uint8, device=x.device) if self.workspace else None
        h, plan, alpha, beta, stream = self._args
        self._stream.value = delta_cuda.cur_stream(x.device.index)
        f = self.lib.cusparseLtMatmulSearch if search else self.lib.cusparseLtMatmul
        _check(f(h, plan, alpha, a.data_ptr(), x.data_ptr(), beta, y.data_ptr(), y.data_ptr(),
                 ws.data_ptr() if ws is not None else None, stream, 1), "the search" if search else "the product")

    def close(self) -> None:
        destroy = {"desc": self.lib.cusparseLtMatDescriptorDestroy, "alg": self.lib.cusparseLtMatmulAlgSelectionDestroy,
                   "plan": self.lib.cusparseLtMatmulPlanDestroy}
        for kind, obj in reversed(self.made):
            destroy[kind](obj)
        self.made = []


class _Plans:
    """Plans by (device, n, k, token bucket, whether searched), the least recently used closed past ``PLANS``; a key
    whose plan failed is remembered as ``None`` (that shape goes the other way). A plan's host-side arguments are
    shared by its calls: one plan is meant for one thread's stream at a time."""

    def __init__(self):
        self.plans: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.plans:
                self.plans.move_to_end(key)
                return self.plans[key]
            try:
                plan = _Plan(*key)
            except RuntimeError as e:
                _warn("cuSPARSELt refused %s tokens of a %s × %s weight (%s); unpacking for cuBLAS instead",
                      key[3], key[1], key[2], e)
                plan = None
            self.plans[key] = plan
            while len(self.plans) > PLANS:
                _, old = self.plans.popitem(last=False)
                if old is not None:
                    old.close()
            return plan

    def drop(self, key) -> None:
        """Remember ``key`` as refused (after a failed product)."""
        with self.lock:
            old = self.plans.get(key)
            if old is not None:
                old.close()
            self.plans[key] = None


_plans = _Plans()


@functools.cache
def _capable(dev: int) -> bool:
    return delta_cuda.capability(dev)[0] >= 8 and _lib() is not None


def available(x: torch.Tensor) -> bool:
    """Whether this path can run here: ``ENABLED``, bf16 x on a CUDA device of compute capability 8.0 or later,
    cuSPARSELt loads."""
    return ENABLED and x.is_cuda and x.dtype == torch.bfloat16 and _capable(x.device.index)


@functools.cache
def _convert_kernel(device: int):
    """:data:`CONVERT` compiled for ``device``, or ``None`` (one warning) where it does not compile."""
    try:
        with torch.cuda.device(device):
            return torch.cuda._compile_kernel(CONVERT, "nm24_to_cslt")
    except (RuntimeError, OSError, AttributeError) as e:
        log.warning("the nm24 → cuSPARSELt kernel did not compile (%s)", str(e).splitlines()[0][:160])
        return None


def convert(values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The nm24 weight in cuSPARSELt's compressed layout (``n·k·9/8`` bytes, uint8: values, then metadata), or
    ``None`` when the kernel did not compile here."""
    dev = values.device.index
    kern = _convert_kernel(dev)
    if kern is None:
        return None
    out = torch.empty(n * k * 9 // 8, dtype=torch.uint8, device=values.device)
    tiles = (n // 16) * (k // 32)
    if tiles:
        o = out.data_ptr()
        delta_cuda._launch(kern, (-(-tiles * 32 // 256), 1), 256, 0, delta_cuda.cur_stream(dev),
                           (values, meta, o, o + n * k), (n, k, tiles))
    return out


def layout_ok(device: torch.device) -> bool:
    """Whether :func:`convert` writes what cuSPARSELt reads on ``device``: a 192 × 1152 2:4 weight (two nonzeros in
    every group) converted, against ``torch._cslt_compress`` byte for byte. The layout was read off cuSPARSELt 0.8.0
    on an H200; another release or architecture may lay its bytes out otherwise, and then this path must not run
    (it would give wrong products). Any failure here only turns the path off (one warning)."""
    from layerprune.pruners.masks import nm_mask
    from layerprune.sparse import nm24

    n, k = 192, 1152
    try:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).bfloat16()
        w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0).to(device)
        sp = nm24.pack(w)
        got = convert(sp.values, sp.meta, n, k)
        ok = got is not None and torch.equal(got, torch._cslt_compress(w).view(torch.uint8).reshape(-1))
    except Exception as e:  # noqa: BLE001 (whatever went wrong, the other path serves)
        log.warning("cuSPARSELt's compressed layout could not be checked here (%s); 2:4 prefills unpack for cuBLAS",
                    str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        return False
    if not ok:
        log.warning("cuSPARSELt's compressed layout on %s differs from the one layerprune writes (read off cuSPARSELt "
                    "0.8.0 on an H200); 2:4 prefills unpack for cuBLAS", device)
    return ok


_layout: dict[int, bool] = {}


def mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """y (b × n) = x (b × k) · Wᵀ for W (n × k) in the nm24 layout, on the sparse tensor cores through cuSPARSELt, or
    ``None`` when this path cannot serve (then the caller unpacks for cuBLAS; also where :func:`layout_ok` found
    another compressed layout on this device). x is padded with zero rows to a
    multiple of ``BUCKET`` tokens; the plan for that count is made (and its algorithm searched, outside CUDA-graph
    capture, when ``SEARCH``) at its first call: 13–542 ms on the H200 for the LLaMA shapes at 128–2048 tokens
    (session 29), paid once per shape and bucket."""
    if not (fits(n, k) and available(x)):
        return None
    dev = x.device.index
    if dev not in _layout:  # checked once a device, outside CUDA-graph capture
        if torch.cuda.is_current_stream_capturing():
            return None
        _layout[dev] = layout_ok(x.device)
    if not _layout[dev]:
        return None
    b = x.shape[0]
    if b == 0:
        return x.new_zeros(0, n)
    bp = -(-b // BUCKET) * BUCKET
    plan = _plans.get((dev, n, k, bp, SEARCH))
    if plan is None:
        return None
    if bp != b or x.stride(-1) != 1 or x.stride(0) != k or x.data_ptr() % 16:
        xp = torch.empty(bp, k, dtype=x.dtype, device=x.device)
        xp[:b] = x
        xp[b:] = 0
        x = xp
    a = convert(values, meta, n, k)
    if a is None:
        return None
    y = torch.empty(bp, n, dtype=x.dtype, device=x.device)
    try:
        if not plan.searched and not torch.cuda.is_current_stream_capturing():
            plan.search(a, x, y)
        plan.run(a, x, y)
    except RuntimeError as e:
        _warn("cuSPARSELt failed on %s tokens of a %s × %s weight (%s); unpacking for cuBLAS instead", b, n, k, e)
        _plans.drop((dev, n, k, bp, SEARCH))
        return None
    return y[:b]
