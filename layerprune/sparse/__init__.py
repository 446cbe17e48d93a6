"""Sparse inference: a compressed format for pruned linears, ``SparseLinear`` with Triton kernels, export/load.

``format.py`` (pack / unpack / validate, pure torch) → ``kernels.py`` (Triton: decode-GEMM for small
batches, tile decompression for large ones) → ``linear.py`` (``SparseLinear`` and the ``torch.library``
op ``layerprune::sparse_linear``) → ``export.py`` (``export_sparse`` / ``load_sparse``) → ``runtime.py``
(generation) and ``bench.py`` (``layerprune bench-decode``).
"""

from layerprune.sparse.format import SparseTensor, pack, unpack
from layerprune.sparse.linear import SparseLinear

__all__ = ["SparseLinear", "SparseTensor", "load_sparse", "pack", "unpack"]


def load_sparse(path, device="cpu", dtype=None):
    """A Hugging Face model whose pruned linears are :class:`SparseLinear` (see ``sparse/export.py``)."""
    from layerprune.sparse.export import load_sparse as _load

    return _load(path, device=device, dtype=dtype)
