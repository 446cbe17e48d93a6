"""layerprune: post-training LLM sparsity with a different sparsity for each layer.

Public API::

    from layerprune import load_model, prune, allocate, evaluate, load_sparse
"""

import time as _time

IMPORTED_AT = _time.perf_counter()  # the CLI's run record counts its start-up (imports, arguments) from here
__version__ = "0.1.0"

from layerprune.api import allocate, evaluate, prune  # noqa: E402
from layerprune.models import load_model  # noqa: E402


def load_sparse(path, device="cpu", dtype=None, merge=False):
    """A Hugging Face causal LM from a sparse directory (``layerprune export --format sparse``) whose packed
    linears are ``SparseLinear`` (:func:`layerprune.sparse.export.load_sparse`); ``merge``: q/k/v and gate/up run
    as one stacked linear each (:mod:`layerprune.sparse.merge`)."""
    from layerprune.sparse.export import load_sparse as _load

    return _load(path, device=device, dtype=dtype, merge=merge)


__all__ = ["__version__", "allocate", "evaluate", "load_model", "load_sparse", "prune"]
