"""Where an export may write, and what it leaves behind when it stops early.

``--force`` replaces only a folder that is verifiably a bundle qwenvl-edge wrote (every file in it
listed by its manifest, with the manifest's size and sha256, no symlinks, nothing else), and never
the checkpoint, a folder holding it, or one inside it: anything the user owns is refused in one
line, never deleted. The manifest is data: its file names must be plain names, its entries typed.
Partial folders carry their PID (``.OUT.partial-PID``): those of dead
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
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_edge import contract
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.validate import plain_name

BUNDLE_FORMAT = "qwenvl-edge-bundle"
MANIFEST = contract.MANIFEST_FILE
PARTIAL = re.compile(r"\.partial-(\d+)$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MANIFEST_MAX_BYTES = 16 * 2**20
MAX_FILES = 64
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BUNDLE_PARTS = ("vision.onnx", "llm.gguf")  # every bundle the export writes holds both


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def checked_entry(entry: Any) -> dict[str, Any] | None:
    """A file entry ``{"bytes": int, "sha256": hex}`` as ``file_entry`` writes it, or None."""
    if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"}:
        return None
    size, digest = entry["bytes"], entry["sha256"]
    if type(size) is not int or not 0 <= size < 2**53 or not isinstance(digest, str) \
            or not SHA256_HEX.fullmatch(digest):
        return None
    return {"bytes": size, "sha256": digest}


def checked_files(files: Any, reserved: tuple[str, ...] = ()) -> dict[str, dict[str, Any]] | None:
    """A ``{name: entry}`` map read from disk whose names are plain file names in the same folder, or None."""
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        return None
    out = {}
    for name, entry in files.items():
        try:
            plain_name(name, "files", QwenVLError)
        except QwenVLError:
            return None
        checked = checked_entry(entry)
        if checked is None or name in reserved or name.startswith(".") or len(name) > 255:
            return None
        out[name] = checked
    return out


def _bundle_files(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files a bundle's manifest lists (checked as data), or None if ``folder`` holds no bundle manifest."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MANIFEST_MAX_BYTES:
            return None
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        return None
    files = checked_files(manifest.get("files"), reserved=(MANIFEST,))
    return files if files is not None and all(part in files for part in BUNDLE_PARTS) else None


def _listing(folder: Path) -> dict[str, tuple[int, int, int, int]]:
    """name -> (mode, inode, size, mtime) of each entry, symlinks not followed."""
    out = {}
    for entry in folder.iterdir():
        st = os.lstat(entry)
        out[entry.name] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@dataclass(frozen=True)
class OldBundle:
    """An old bundle ``--force`` may replace: verified file by file, and what its entries looked like then."""

    folder: Path
    seen: dict[str, tuple[int, int, int, int]]

    def unchanged(self) -> bool:
        """Nothing added, removed or rewritten since it was verified (same inodes, sizes, mtimes)."""
        try:
            return _listing(self.folder) == self.seen
        except OSError:
            return False


def _verify_old_bundle(out: Path) -> OldBundle:
    """``out`` as an ``OldBundle``, or a one-line refusal naming what is not verifiably the tool's."""
    files = _bundle_files(out)
    if files is None:
        raise QwenVLError(f"{out}: not a qwenvl-edge bundle (no valid bundle manifest); --force replaces only bundles")
    seen = _listing(out)
    foreign = sorted(e for e, (mode, *_rest) in seen.items()
                     if (e not in files and e != MANIFEST) or not stat.S_ISREG(mode))
    if foreign:
        raise QwenVLError(f"{out}: holds {len(foreign)} file(s) that are not part of the bundle "
                          f"(e.g. {foreign[0]}); --force replaces only a bundle folder")
    missing = sorted(set(files) - set(seen))
    if missing:
        raise QwenVLError(f"{out}: {missing[0]}, listed by its manifest, is missing; --force replaces only a "
                          "complete bundle (remove the folder yourself if it is yours)")
    changed = sorted(e for e, (_m, _i, size, _t) in seen.items() if e != MANIFEST and size != files[e]["bytes"])
    if not changed:
        from qwenvl_edge.runtime.bundle import file_entry

        changed = [e for e in sorted(seen) if e != MANIFEST and file_entry(out / e) != files[e]]
    if changed:
        raise QwenVLError(f"{out}: {changed[0]} does not match the size and sha256 its manifest gives; "
                          "--force replaces only an unmodified bundle")
    return OldBundle(out, seen)


def check_target(checkpoint: Path, out: Path, force: bool) -> OldBundle | None:
    """Refuse an ``out`` that would overwrite anything but an old bundle (one-line ``QwenVLError``).

    Returns the verified old bundle ``--force`` will replace (None when ``out`` is absent or empty)."""
    ckpt, target = Path(checkpoint).resolve(), Path(out).resolve()
    if _inside(target, ckpt) or _inside(ckpt, target):
        what = "is" if target == ckpt else "is inside" if _inside(target, ckpt) else "holds"
        raise QwenVLError(f"{out}: {what} the checkpoint {checkpoint}; write the bundle somewhere else")
    if not os.path.lexists(out):
        return None
    if Path(out).is_symlink():
        raise QwenVLError(f"{out}: is a symbolic link; give the real folder")
    if not Path(out).is_dir():
        raise QwenVLError(f"{out}: exists and is not a folder")
    if not any(Path(out).iterdir()):
        return None
    if not force:
        raise QwenVLError(f"{out}: exists and is not empty (pass --force to replace an old bundle)")
    return _verify_old_bundle(Path(out))


def replace_folder(work: Path, out: Path, old: OldBundle | None) -> Path | None:
    """``work`` takes ``out``'s name. Only the verified old bundle's files are deleted (and only if nothing
    changed since ``check_target``); returns a folder kept because something appeared in it meanwhile."""
    aside = None
    if os.path.lexists(out):
        if old is None and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif old is None or not old.unchanged():
            raise QwenVLError(f"{out}: changed while the export ran; nothing was replaced "
                              "(the finished stages are kept: run the export again)")
        else:
            aside = out.parent / partial_name(out.name + ".old")
            out.rename(aside)
    work.rename(out)
    if aside is None:
        return None
    for name, (mode, *_rest) in old.seen.items():
        if stat.S_ISREG(mode):
            (aside / name).unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:  # something was added in the instant between the check and the rename: keep it
        kept = out.parent / f"{out.name}.replaced-{os.getpid()}"
        aside.rename(kept)
        return kept
    return None


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
    """While the block runs (main thread only), SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt``.

    SIGINT is set explicitly: a process started with SIGINT ignored (a script's background job) would
    otherwise finish a long export after ``kill -INT``. The handlers only raise, in Python code: a
    stage stuck in one long C call runs it in a worker process the parent kills (``gguf_quant``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame) -> None:
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


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
