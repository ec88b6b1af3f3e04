"""Shell completion scripts for bash and zsh, generated from the parser itself by ``shtab``.

Static scripts (printed once, sourced by the shell) rather than argcomplete's run-Python-on-every-Tab:
completing never imports the package. Options that take paths complete file names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwenvl_edge.errors import QwenVLError


def _mark_paths(parser: argparse.ArgumentParser, shtab) -> None:
    """Every option or argument whose type is ``Path`` completes files (folders for --bundle/--dir)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub, shtab)
        elif action.type is Path:
            folder = action.dest in {"bundle", "dir", "out", "checkpoint"}
            action.complete = shtab.DIRECTORY if folder else shtab.FILE
        elif action.dest in {"images", "items"}:
            action.complete = shtab.FILE


def script(shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh")."""
    try:
        import shtab
    except ImportError:
        raise QwenVLError("shell completion needs the shtab package: pip install shtab") from None
    from qwenvl_edge.cli import build_parser

    parser = build_parser()
    _mark_paths(parser, shtab)
    return shtab.complete(parser, shell=shell)
