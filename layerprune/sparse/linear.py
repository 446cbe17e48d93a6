"""``SparseLinear``: a drop-in for ``nn.Linear`` holding a packed weight (:mod:`layerprune.sparse.format`).

Its forward is one PyTorch custom op, ``torch.ops.layerprune.sparse_linear`` (``torch.library``), so
``torch.compile`` and CUDA-graph capture take it as it is. The op picks the path by where it runs:
CUDA with Triton → the decode kernel for up to ``SMALL_BATCH`` tokens, else decompress + ``F.linear``
(cuBLAS); no CUDA or no Triton → unpack with plain PyTorch and ``F.linear`` (correct, not fast; one
warning).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.sparse import kernels
from layerprune.sparse.format import SparseTensor, pack, unpack

log = logging.getLogger("layerprune")
_warned = False


@torch.library.custom_op("layerprune::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """y = x · Wᵀ for a packed W (n × k); x is (..., k)."""
    global _warned
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if kernels.usable(x.device):
        if x2.shape[0] <= kernels.SMALL_BATCH:
            y = kernels.sparse_mm(x2.contiguous(), bitmask, values, offsets, n, k, bn, bk)
        else:
            y = F.linear(x2, kernels.decompress(bitmask, values, offsets, n, k, bn, bk))
    else:
        if not _warned and x.device.type == "cuda":
            log.warning("SparseLinear: Triton is not available, using the plain PyTorch path (correct, not fast)")
            _warned = True
        y = F.linear(x2, unpack(SparseTensor(bitmask, values, offsets, (n, k), bn, bk)).to(x2.dtype))
    return y.reshape(*lead, n)


@sparse_linear.register_fake
def _(x, bitmask, values, offsets, n, k, bn, bk):
    return x.new_empty(*x.shape[:-1], n)


class SparseLinear(nn.Module):
    """``nn.Linear`` with a packed weight; the buffers are the format's three tensors."""

    def __init__(self, in_features: int, out_features: int, bias: bool, sp: SparseTensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if sp is None:  # empty shell, filled by load_state_dict
            from layerprune.sparse.format import BK, BN

            rb, kt = -(-out_features // BN), -(-in_features // BK)
            sp = SparseTensor(torch.zeros(rb * kt, BN, BK // 32, dtype=torch.int32, device=device),
                              torch.zeros(0, dtype=dtype, device=device),
                              torch.zeros(rb * kt + 1, dtype=torch.int32, device=device),
                              (out_features, in_features))
        self.bn, self.bk = sp.bn, sp.bk
        self.register_buffer("bitmask", sp.bitmask)
        self.register_buffer("values", sp.values)
        self.register_buffer("offsets", sp.offsets)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "SparseLinear":
        sp = pack(lin.weight.data)
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, sp, lin.weight.dtype, lin.weight.device)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.data)
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        v = state_dict.get(prefix + "values")
        if v is not None and v.shape != self.values.shape:  # nnz is known only from the checkpoint
            self.values = torch.empty_like(v, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self) -> SparseTensor:
        return SparseTensor(self.bitmask, self.values, self.offsets, (self.out_features, self.in_features),
                            self.bn, self.bk)

    def dense_weight(self) -> torch.Tensor:
        return unpack(self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.layerprune.sparse_linear(x, self.bitmask, self.values, self.offsets, self.out_features,
                                               self.in_features, self.bn, self.bk)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        nnz = self.values.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.3f}, bias={self.bias is not None}")
