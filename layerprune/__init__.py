"""layerprune: post-training LLM sparsity with a different sparsity for each layer.

Public API::

    from layerprune import load_model, prune, allocate, evaluate, load_sparse
"""

import time as _time

IMPORTED_AT = _time.perf_counter()  # the CLI's run record counts its start-up (imports, arguments) from here
__version__ = "0.1.0"

from layerprune.api import allocate, evaluate, prune  # noqa: E402
from layerprune.models import load_model  # noqa: E402


def __getattr__(name: str):
    """``load_sparse`` (:func:`layerprune.sparse.export.load_sparse`), imported on first use: the sparse kernels
    and transformers' model classes stay out of ``import layerprune``."""
    if name == "load_sparse":
        from layerprune.sparse.export import load_sparse

        return load_sparse
    raise AttributeError(f"module 'layerprune' has no attribute {name!r}")


__all__ = ["__version__", "allocate", "evaluate", "load_model", "load_sparse", "prune"]
