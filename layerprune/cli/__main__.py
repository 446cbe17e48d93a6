"""``python -m layerprune.cli``: the command line (same as the ``layerprune`` script)."""

from layerprune.cli import run

run()
