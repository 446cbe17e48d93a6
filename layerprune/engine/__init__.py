"""The only code that knows how HF models run: capture block inputs, run blocks one at a time, score the head."""

from layerprune.engine.runner import BlockRunner, move_non_block
from layerprune.engine.sequential import PruneResult, dense_sweep, prune_sequential

__all__ = ["BlockRunner", "PruneResult", "dense_sweep", "move_non_block", "prune_sequential"]
