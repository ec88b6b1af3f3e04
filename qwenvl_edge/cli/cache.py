"""``qwenvl-edge cache``: the runtime's checked store (``runtime/store.py``), per kind, and clearing it.

The store lives under ``$XDG_CACHE_HOME/qwenvl-edge/`` (default ``~/.cache/qwenvl-edge/``), one folder
per kind. Clearing goes through the store, which removes only its own entry files: the default bundle
and the demo that live in the same folder are never touched.
"""

from __future__ import annotations

from pathlib import Path

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
    from qwenvl_edge.bundler.export_stages import resume_folders

    folders = resume_folders()
    return len(folders), sum(f.lstat().st_size for d in folders for f in d.rglob("*") if f.is_file()
                             and not f.is_symlink())


def check_clear(folder: Path, kinds: list[str]) -> None:
    """Before ``cache clear`` removes anything: no symlinked cache folder (root, kind, or a kind's
    subfolder) is followed, and a running export's resume folder is refused (one line, nothing removed)."""
    from qwenvl_edge.bundler.export_stages import check_cache_folders, check_no_running_export, real_folder

    real_folder(folder, "cache folder")
    for kind in kinds:
        if kind == "export":
            check_cache_folders()
            check_no_running_export()
            continue
        real_folder(folder / kind, f"{kind} cache folder")
        if (folder / kind).is_dir():
            for sub in (folder / kind).iterdir():
                real_folder(sub, f"{kind} cache folder")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
