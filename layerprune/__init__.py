"""layerprune: post-training LLM sparsity with a different sparsity for each layer.

Public API::

    from layerprune import load_model, prune, allocate, evaluate
"""

import time as _time

IMPORTED_AT = _time.perf_counter()  # the CLI's run record counts its start-up (imports, arguments) from here
__version__ = "0.1.0"

from layerprune.api import allocate, evaluate, prune  # noqa: E402
from layerprune.models import load_model  # noqa: E402

__all__ = ["__version__", "allocate", "evaluate", "load_model", "prune"]
