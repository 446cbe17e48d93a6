"""``python -m layerprune``: the command line (same as the ``layerprune`` script)."""

from layerprune.cli import run

run()
