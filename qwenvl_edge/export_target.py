"""Where an export may write, and what it leaves behind when it stops early.

``--force`` replaces only a folder that is a qwenvl-edge bundle and holds nothing else, and never
the checkpoint, a folder holding it, or one inside it: anything the user owns is refused in one
line, never deleted. Partial folders carry their PID (``.OUT.partial-PID``): those of dead
processes (a SIGKILL cannot be caught) are swept by the next export; SIGTERM is turned into the
same clean unwinding as Ctrl-C; a full disk becomes one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from qwenvl_edge.errors import QwenVLError

BUNDLE_FORMAT = "qwenvl-edge-bundle"
MANIFEST = "manifest.json"
PARTIAL = re.compile(r"\.partial-(\d+)$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _bundle_files(folder: Path) -> set[str] | None:
    """The names a bundle folder may hold (its manifest's files + the manifest), or None if not a bundle."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"] if manifest.get("format") == BUNDLE_FORMAT else None
        return {str(name) for name in files} | {MANIFEST} if isinstance(files, dict) else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def check_target(checkpoint: Path, out: Path, force: bool) -> None:
    """Refuse an ``out`` that would overwrite anything but an old bundle (one-line ``QwenVLError``)."""
    ckpt, target = Path(checkpoint).resolve(), Path(out).resolve()
    if _inside(target, ckpt) or _inside(ckpt, target):
        what = "is" if target == ckpt else "is inside" if _inside(target, ckpt) else "holds"
        raise QwenVLError(f"{out}: {what} the checkpoint {checkpoint}; write the bundle somewhere else")
    if not os.path.lexists(out):
        return
    if Path(out).is_symlink():
        raise QwenVLError(f"{out}: is a symbolic link; give the real folder")
    if not Path(out).is_dir():
        raise QwenVLError(f"{out}: exists and is not a folder")
    entries = {p.name for p in Path(out).iterdir()}
    if not entries:
        return
    if not force:
        raise QwenVLError(f"{out}: exists and is not empty (pass --force to replace an old bundle)")
    allowed = _bundle_files(Path(out))
    if allowed is None:
        raise QwenVLError(f"{out}: not a qwenvl-edge bundle (no bundle manifest); --force replaces only bundles")
    foreign = sorted(e for e in entries if e not in allowed or not (Path(out) / e).is_file()
                     or (Path(out) / e).is_symlink())
    if foreign:
        raise QwenVLError(f"{out}: holds {len(foreign)} file(s) that are not part of the bundle "
                          f"(e.g. {foreign[0]}); --force replaces only a bundle folder")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove ``<prefix>*.partial-PID`` entries in ``folder`` whose process is gone; return them."""
    swept = []
    if not folder.is_dir():
        return swept
    for entry in folder.iterdir():
        m = PARTIAL.search(entry.name)
        if entry.name.startswith(prefix) and m and not pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            swept.append(entry)
    return swept


def partial_name(name: str) -> str:
    return f".{name}.partial-{os.getpid()}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so every ``finally`` removes what it was writing."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs (main thread only), SIGTERM raises ``Terminated``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame) -> None:
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def disk_space_errors(folder: Path, what: str) -> Iterator[None]:
    """A full disk (or file-size limit) while writing ``what`` becomes one line naming the folder."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            free = shutil.disk_usage(folder).free if folder.exists() else 0
            raise QwenVLError(f"{folder}: no space left while writing {what} ({free / 2**30:.1f} GiB free); "
                              "free some space and run the export again (finished stages are kept)") from None
        raise
