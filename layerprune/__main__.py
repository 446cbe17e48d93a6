"""``python -m layerprune``: the command line (same as the ``layerprune`` script)."""

import sys

from layerprune.cli import main

sys.exit(main())
