"""``SparseLinear``: a drop-in for ``nn.Linear`` holding a packed weight in one of three layouts.

* ``delta`` (default, :mod:`layerprune.sparse.delta`): row-major values + 4-bit column deltas. The fast
  one for decode (bf16, CUDA kernel, at 70% on the H200: one token 1.37–2.08× dense per LLaMA-2 7B–70B linear,
  four tokens 0.97–1.46×, sixteen 0.64–0.79× on tensor cores); past 32 tokens (64 on K > 12288) the weight is
  unpacked (CUDA kernel) and cuBLAS runs it: prefill at 0.79–0.88× of dense.
* ``bitmask`` (:mod:`layerprune.sparse.format`): tile-major bitmask + values. Dense speed at 70% for one
  token; 1–64 tokens (bf16, CUDA) on tensor cores with the weight decoded into mma fragments
  (:mod:`layerprune.sparse.bitmask_cuda`: at 70% 0.87–1.11× of dense at two tokens, 0.76–0.95× at sixteen on
  7B/8B/70B shapes, BENCHMARKS.md session 20; on Hopper, 17–64 tokens of large weights go to
  :mod:`layerprune.sparse.bitmask_wgmma`, 2–10% faster: session 21); a tile decompression for prefill that costs
  15–25% over dense.
* ``nm24`` (:mod:`layerprune.sparse.nm24`): for 2:4 weights only, the kept values and metadata in the order of the
  sparse tensor cores' fragments (``mma.sp``, :mod:`layerprune.sparse.nm24_cuda`, bf16, Ampere and later): 1–64
  tokens stream the packed weight straight into registers, nothing decoded; prefills (``nm24_cslt_wanted``: from
  1024 tokens) on cuSPARSELt's sparse tensor cores (:mod:`layerprune.sparse.cslt`, session 29: 2048 tokens
  1.02–1.15× of dense per linear); in between unpacked for cuBLAS.

Each layout's forward is one PyTorch custom op (``torch.library``: ``layerprune::sparse_linear_delta``,
``layerprune::sparse_linear``, ``layerprune::sparse_linear_nm24``), so ``torch.compile`` and CUDA-graph capture
take it as it is. The op
picks the path by where it runs: CUDA with Triton → the decode kernels for small batches (bf16: the CUDA
kernels of ``delta_cuda`` when they compiled, gathering x for 1–8 tokens, tensor cores for 9–32, or up to 64
on K > 12288), else decompress + ``F.linear`` (cuBLAS); no CUDA or no Triton → unpack with plain PyTorch and
``F.linear`` (correct, not fast; one warning).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.sparse import bitmask_cuda, bitmask_wgmma, cslt, delta, delta_kernels, kernels, nm24, nm24_cuda
from layerprune.sparse.format import SparseTensor, pack, unpack

log = logging.getLogger("layerprune")
_warned = _warned_nm24 = False
LAYOUTS = ("delta", "bitmask", "nm24")
BUFFERS = {"delta": ("values", "deltas", "starts", "gptr"), "bitmask": ("bitmask", "values", "offsets"),
           "nm24": ("values", "meta")}
NM24_TOKENS = 64  # the nm24 kernel at most up to this many tokens (nm24_kernel_wanted), then unpack + cuBLAS
Packed = SparseTensor | delta.DeltaTensor | nm24.NM24Tensor


def _torch_path(x: torch.Tensor) -> None:
    global _warned
    if not _warned and x.device.type == "cuda":
        log.warning("SparseLinear: Triton is not available, using the plain PyTorch path (correct, not fast)")
        _warned = True


# The ops are defined with torch.library.Library rather than the @custom_op decorator: its Python dispatch
# (autograd wrapper, aliasing checks on every call) costs ≈ 25 µs per call on a 2-core CPU against 5–8 µs here
# (bench/op_dispatch.py), and an eager decode step of a 7B model makes 224 such calls. Functional schemas, one
# Python kernel for every backend (it picks its path by device), a fake kernel for torch.compile.
_LIB = torch.library.Library("layerprune", "DEF")
_LIB.define("sparse_linear(Tensor x, Tensor bitmask, Tensor values, Tensor offsets, int n, int k, int bn, int bk) -> Tensor")
_LIB.define("sparse_linear_delta(Tensor x, Tensor values, Tensor deltas, Tensor starts, Tensor gptr, int n, int k) -> Tensor")
_LIB.define("sparse_linear_nm24(Tensor x, Tensor values, Tensor meta, int n, int k) -> Tensor")


def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """y = x · Wᵀ for a W (n × k) in the bitmask layout; x is (..., k)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if kernels.usable(x.device):
        b = x2.shape[0]
        y = None  # up to 64 tokens: a CUDA tensor-core kernel when one runs here (wgmma on Hopper for 17–64 tokens of
        # large weights, else mma.sync), else Triton's
        if bitmask_wgmma.wanted(b, n, k) and bitmask_wgmma.usable(x2, bitmask, values, bn, bk):
            y = bitmask_wgmma.spmm(x2, bitmask, values, offsets, n, k)
        if y is None and bitmask_cuda.wanted(b, n, k, values.numel()) and bitmask_cuda.usable(x2, bitmask, values, bn, bk):
            y = bitmask_cuda.spmm(x2, bitmask, values, offsets, n, k)
        if y is None and b <= kernels.SMALL_BATCH:
            y = kernels.sparse_mm(x2.contiguous(), bitmask, values, offsets, n, k, bn, bk)
        elif y is None:
            y = F.linear(x2, kernels.decompress(bitmask, values, offsets, n, k, bn, bk))
    else:
        _torch_path(x)
        y = F.linear(x2, unpack(SparseTensor(bitmask, values, offsets, (n, k), bn, bk)).to(x2.dtype))
    return y.reshape(*lead, n)


_LIB.impl("sparse_linear", sparse_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("layerprune::sparse_linear", lib=_LIB)
def _(x, bitmask, values, offsets, n, k, bn, bk):
    return x.new_empty(*x.shape[:-1], n)


def sparse_linear_delta(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor,
                        gptr: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """y = x · Wᵀ for a W (n × k) in the delta layout; x is (..., k)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if delta_kernels.usable(x.device):
        if x2.shape[0] <= delta_kernels.SMALL_BATCH:
            y = delta_kernels.sparse_mm(x2.contiguous(), values, deltas, starts, gptr, n, k)
        else:
            y = delta_kernels.tensor_cores(x2, values, deltas, starts, gptr, n, k)
            if y is None:
                y = F.linear(x2, delta_kernels.decompress(values, deltas, starts, gptr, n, k))
    else:
        _torch_path(x)
        y = F.linear(x2, delta.unpack(delta.DeltaTensor(values, deltas, starts, gptr, (n, k))).to(x2.dtype))
    return y.reshape(*lead, n)


_LIB.impl("sparse_linear_delta", sparse_linear_delta, "CompositeExplicitAutograd")


@torch.library.register_fake("layerprune::sparse_linear_delta", lib=_LIB)
def _(x, values, deltas, starts, gptr, n, k):
    return x.new_empty(*x.shape[:-1], n)


def nm24_kernel_wanted(b: int, n: int, k: int) -> bool:
    """Whether ``b`` tokens of an n × k nm24 weight go to the sparse tensor-core kernel rather than unpack + cuBLAS:
    up to 32 tokens always, up to ``NM24_TOKENS`` on weights of 32 M or more (on the H200, session 28: 1024 × 4096 at
    16 and 32 tokens 0.94× and 0.75× in the kernel, about 0.68× unpacked; at 64 tokens 0.48× against 0.68×; the
    7B/8B/70B weights of 45 M or more at 64 tokens 0.67–0.91× in the kernel)."""
    return b <= 32 or (b <= NM24_TOKENS and n * k >= 32 * 2**20)


CSLT_TOKENS, CSLT_WEIGHTS = 1024, 4096 * 4096  # nm24 products to cuSPARSELt: this many tokens of weights this large


def nm24_cslt_wanted(b: int, n: int, k: int) -> bool:
    """Whether ``b`` tokens of an n × k nm24 weight go to cuSPARSELt (:mod:`layerprune.sparse.cslt`) rather than
    unpack + cuBLAS: ``CSLT_TOKENS`` tokens or more of a weight of ``CSLT_WEIGHTS`` or more. On the H200 (session 29,
    ``bench/probe_24prefill.py``, GPU time against ``F.linear``): at 2048 tokens 1.14–1.24× on the LLaMA shapes of
    4096 × 4096 or more against 0.84–0.94× unpacked, at 1024 tokens 0.88–1.03× against 0.74–0.83×; 1024 × 4096 is
    better unpacked. At 512 tokens it is ahead per linear only from 50 M weights (0.66–0.80× against 0.63–0.68×), but
    a call costs more host time (at 512 tokens 65–68 µs with the GPU idle and 150–206 µs behind queued work, against
    37–46 and 64–119 µs for the unpack path; ``bench/probe_cslt_host.py``), and a 7B model's eager prefill of 512
    tokens, host-bound, lost with its stacked q/k/v and gate/up there (0.54× of dense against 0.67× unpacked; 2048
    tokens: 0.95× against 0.83×; ``sparse_decode.py --parts e2e24 --e2e-prefill``)."""
    return b >= CSLT_TOKENS and n * k >= CSLT_WEIGHTS and cslt.fits(n, k)


def sparse_linear_nm24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """y = x · Wᵀ for a W (n × k) in the nm24 layout; x is (..., k). CUDA (bf16, Ampere and later): the sparse
    tensor-core kernel up to ``NM24_TOKENS`` tokens, cuSPARSELt for prefills (``nm24_cslt_wanted``), else the weight
    unpacked (CUDA kernel) and cuBLAS; otherwise unpacked with PyTorch (correct, not fast)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = None
    if nm24_cuda.usable(x2, values):
        if nm24_kernel_wanted(x2.shape[0], n, k):
            y = nm24_cuda.spmm(x2, values, meta, n, k)
        elif nm24_cslt_wanted(x2.shape[0], n, k):
            y = cslt.mm(x2, values, meta, n, k)
        if y is None:
            w = nm24_cuda.unpack(values, meta, n, k)
            y = None if w is None else F.linear(x2, w)
    if y is None:
        global _warned_nm24
        if x.device.type == "cuda" and not _warned_nm24:
            log.warning("SparseLinear (nm24): the sparse tensor-core kernels need bf16 on compute capability 8.0 or "
                        "later; using the plain PyTorch path (correct, not fast)")
            _warned_nm24 = True
        y = F.linear(x2, nm24.unpack(nm24.NM24Tensor(values, meta, (n, k))).to(x2.dtype))
    return y.reshape(*lead, n)


_LIB.impl("sparse_linear_nm24", sparse_linear_nm24, "CompositeExplicitAutograd")


@torch.library.register_fake("layerprune::sparse_linear_nm24", lib=_LIB)
def _(x, values, meta, n, k):
    return x.new_empty(*x.shape[:-1], n)


_PATHS = {"delta": (sparse_linear_delta, torch.ops.layerprune.sparse_linear_delta),  # layout → (implementation, op)
          "nm24": (sparse_linear_nm24, torch.ops.layerprune.sparse_linear_nm24),
          "bitmask": (sparse_linear, torch.ops.layerprune.sparse_linear)}
DIRECT = True  # SparseLinear calls the op's implementation directly where ``direct`` allows (off: always the op)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def direct(x: torch.Tensor) -> bool:
    """Whether ``SparseLinear.forward`` may call its op's Python implementation itself rather than through
    ``torch.ops``: a plain CUDA tensor, eager (not traced or compiled: ``torch.compile``, ``torch.export`` and FX see
    the op), no gradient wanted (the op has no backward). The same function runs either way; the dispatcher's
    round trip costs a few µs of host time a call, which an eager decode step of a 7B model pays 128–224 times
    (BENCHMARKS.md, session 30)."""
    return (DIRECT and type(x) is torch.Tensor and x.is_cuda and not _compiling() and not torch.jit.is_tracing()
            and not (x.requires_grad and torch.is_grad_enabled()))


def pack_as(w: torch.Tensor, layout: str) -> Packed:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sparse layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout == "nm24":
        return nm24.pack(w)
    return delta.pack(w) if layout == "delta" else pack(w)


class SparseLinear(nn.Module):
    """``nn.Linear`` with a packed weight; the buffers are the layout's tensors (``BUFFERS``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, sp: Packed | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", layout: str = "delta") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if sp is None:  # empty shell, filled by load_state_dict (sizes come from the checkpoint)
            sp = _empty(in_features, out_features, dtype, device, layout)
        self.layout = ("delta" if isinstance(sp, delta.DeltaTensor) else "nm24" if isinstance(sp, nm24.NM24Tensor)
                       else "bitmask")
        self.bn, self.bk = (sp.bn, sp.bk) if self.layout == "bitmask" else (0, 0)
        for name in BUFFERS[self.layout]:
            self.register_buffer(name, getattr(sp, name))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, layout: str = "delta", pack_device: torch.device | str | None = None) -> "SparseLinear":
        """Pack ``lin``'s weight (on ``pack_device`` when given, e.g. a GPU for a model held on the CPU: the
        format is exact, so where it is packed changes no bit); the buffers stay on the weight's device."""
        w = lin.weight.data
        if pack_device is None or torch.device(pack_device) == w.device:
            sp = pack_as(w, layout)
        else:
            sp = pack_as(w.to(pack_device), layout)
            sp = dataclasses.replace(sp, **{b: getattr(sp, b).to(w.device) for b in BUFFERS[layout]})
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, sp, lin.weight.dtype, lin.weight.device)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.data)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in BUFFERS[self.layout]:
            v = state_dict.get(prefix + name)
            if v is not None and v.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(v, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self) -> Packed:
        shape = (self.out_features, self.in_features)
        if self.layout == "nm24":
            return nm24.NM24Tensor(self.values, self.meta, shape)
        if self.layout == "delta":
            return delta.DeltaTensor(self.values, self.deltas, self.starts, self.gptr, shape)
        return SparseTensor(self.bitmask, self.values, self.offsets, shape, self.bn, self.bk)

    def dense_weight(self) -> torch.Tensor:
        sp = self.packed()
        if isinstance(sp, nm24.NM24Tensor):
            return nm24.unpack(sp)
        return delta.unpack(sp) if isinstance(sp, delta.DeltaTensor) else unpack(sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.layout == "delta":
            args = (self.values, self.deltas, self.starts, self.gptr, n, k)
        elif self.layout == "nm24":
            args = (self.values, self.meta, n, k)
        else:
            args = (self.bitmask, self.values, self.offsets, n, k, self.bn, self.bk)
        impl, op = _PATHS[self.layout]
        # eager on CUDA the op's implementation runs as it is, without the dispatcher's round trip (``direct``)
        y = impl(x, *args) if direct(x) else op(x, *args)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        nnz = int((self.values != 0).sum())
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.3f}, bias={self.bias is not None}")


def _empty(in_features: int, out_features: int, dtype: torch.dtype, device, layout: str):
    if layout == "delta":
        return delta.DeltaTensor(torch.zeros(0, dtype=dtype, device=device), torch.zeros(0, dtype=torch.uint8, device=device),
                                 torch.zeros(0, dtype=torch.int16, device=device),
                                 torch.zeros(out_features + 1, dtype=torch.int32, device=device), (out_features, in_features))
    if layout == "nm24":
        return nm24.NM24Tensor(torch.zeros(0, 32, 8, dtype=dtype, device=device),
                               torch.zeros(0, 16, dtype=torch.int32, device=device), (out_features, in_features))
    if layout != "bitmask":
        raise ValueError(f"unknown sparse layout {layout!r} (one of {', '.join(LAYOUTS)})")
    from layerprune.sparse.format import BK, BN

    rb, kt = -(-out_features // BN), -(-in_features // BK)
    return SparseTensor(torch.zeros(rb * kt, BN, BK // 32, dtype=torch.int32, device=device),
                        torch.zeros(0, dtype=dtype, device=device),
                        torch.zeros(rb * kt + 1, dtype=torch.int32, device=device), (out_features, in_features))
