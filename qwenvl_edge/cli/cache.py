"""``qwenvl-edge cache``: what the runtime keeps on disk, per kind, and clearing it.

The cache lives under ``$XDG_CACHE_HOME/qwenvl-edge/`` (default ``~/.cache/qwenvl-edge/``), one folder
per kind. Clearing removes only the entries of a kind (files named as the runtime names them) and the
folders left empty, never anything else there: the default bundle and the demo live beside the cache.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from qwenvl_edge.errors import OptionError


@dataclass(frozen=True)
class Kind:
    name: str
    folder: str  # under root()
    pattern: str  # the entries' file names
    description: str


KINDS = (
    Kind("image-rows", "image-rows", "*.npy", "vision rows per image and vision model (~4 MiB per photo)"),
)


def root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl-edge"


def select_kinds(names: list[str] | None) -> list[Kind]:
    if not names:
        return list(KINDS)
    known = {kind.name: kind for kind in KINDS}
    for name in names:
        if name not in known:
            raise OptionError(f"--kind {name!r}: choose {', '.join(known)}")
    return [known[name] for name in names]


def _entries(kind: Kind) -> list[Path]:
    folder = root() / kind.folder
    return [p for p in folder.rglob(kind.pattern) if p.is_file() and not p.is_symlink()] if folder.is_dir() else []


def usage(kind: Kind) -> tuple[int, int]:
    """(entries, bytes) of one kind."""
    entries = _entries(kind)
    return len(entries), sum(p.stat().st_size for p in entries)


def clear(kind: Kind) -> tuple[int, int]:
    """Delete one kind's entries; returns what was removed (entries, bytes)."""
    removed = size = 0
    for path in _entries(kind):
        try:
            bytes_ = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another process evicted it first
            continue
        removed, size = removed + 1, size + bytes_
    folder = root() / kind.folder
    if folder.is_dir():
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir_if_empty(sub)
    return removed, size


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: something else lives there
        folder.rmdir()


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
