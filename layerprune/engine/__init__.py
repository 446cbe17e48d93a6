"""The only code that knows how HF models run: capture block inputs, run blocks one at a time."""

from layerprune.engine.runner import BlockRunner, move_non_block
from layerprune.engine.sequential import PruneResult, dense_stats_pass, prune_sequential

__all__ = ["BlockRunner", "PruneResult", "dense_stats_pass", "move_non_block", "prune_sequential"]
