"""``qwenvl-edge cache``: the runtime's checked store (``runtime/store.py``), per kind, and clearing it.

The store lives under ``$XDG_CACHE_HOME/qwenvl-edge/`` (default ``~/.cache/qwenvl-edge/``), one folder
per kind. Clearing goes through the store, which removes only its own entry files: the default bundle
and the demo that live in the same folder are never touched.
"""

from __future__ import annotations

from qwenvl_edge.errors import OptionError

KINDS = {
    "rows": "image rows: 256 vision rows per photo and vision model (~4 MiB per photo at full size)",
    "prefix": "KV prefix states: the decoder's cache after a prompt's shared start (system prompt, images)",
    "export": "export resume folders: finished stages of an interrupted export (removed when it succeeds)",
}


def select_kinds(names: list[str] | None) -> list[str]:
    if not names:
        return list(KINDS)
    for name in names:
        if name not in KINDS:
            raise OptionError(f"--kind {name!r}: choose {' or '.join(KINDS)}")
    return list(dict.fromkeys(names))


def open_store():
    from qwenvl_edge.runtime.store import Store, default_store_dir

    return Store(default_store_dir())


def export_folders_size() -> tuple[int, int]:
    """(resume folders, bytes) under the export cache (``export_stages``), which the store does not own."""
    from qwenvl_edge.export_stages import export_cache_root

    root = export_cache_root()
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return len(folders), sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
