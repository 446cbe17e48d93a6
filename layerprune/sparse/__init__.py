"""Sparse inference: a compressed format for pruned linears, ``SparseLinear`` with Triton kernels, export/load.

Two layouts, each a pure-torch format (pack / unpack / validate) and its Triton kernels: ``delta.py`` +
``delta_kernels.py`` (values + 4-bit column deltas; the default, fastest at decode) and ``format.py`` +
``kernels.py`` (tile-major bitmask + values; faster prefill) → ``linear.py`` (``SparseLinear`` and the
``torch.library`` ops) → ``export.py`` (``export_sparse`` / ``load_sparse``) → ``runtime.py``
(generation) and ``bench.py`` (``layerprune bench-decode``); ``merge.py`` stacks the linears that read one input.
"""

from layerprune.sparse.delta import DeltaTensor
from layerprune.sparse.format import SparseTensor, pack, unpack
from layerprune.sparse.linear import SparseLinear, pack_as

__all__ = ["DeltaTensor", "SparseLinear", "SparseTensor", "load_sparse", "pack", "pack_as", "unpack"]


def __getattr__(name: str):
    """``load_sparse`` (:func:`layerprune.sparse.export.load_sparse`), imported on first use."""
    if name == "load_sparse":
        from layerprune.sparse.export import load_sparse

        return load_sparse
    raise AttributeError(f"module 'layerprune.sparse' has no attribute {name!r}")
