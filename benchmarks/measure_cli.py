"""The command line every in-process measurement shares: ``BUNDLE --runs N --threads T --json OUT``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def measure_main(measure: Callable[[Path, int, int | None], dict], argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    a.json.write_text(json.dumps(measure(a.bundle, a.runs, a.threads), indent=2))
    return 0
