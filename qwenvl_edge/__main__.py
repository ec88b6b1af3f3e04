"""``python -m qwenvl_edge``: the same as the ``qwenvl-edge`` console script."""

import sys

from qwenvl_edge.cli import main

sys.exit(main())
