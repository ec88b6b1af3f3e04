"""``python -m qwenvl_edge.cli`` (as scripts and benchmarks call it): the same as ``qwenvl-edge``."""

import sys

from qwenvl_edge.cli import main

sys.exit(main())
