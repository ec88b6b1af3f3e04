"""The resume folder: finished export stages kept in the user's cache so an interrupted export resumes.

``$XDG_CACHE_HOME/qwenvl-edge/export/<fingerprint>-<options>/`` (never beside OUT) holds each
finished stage's files and a record (``stages.json``: files with size and sha256, the stage's
report). A stage is written into ``.NAME.partial-PID`` inside it and only recorded when complete;
its partial folder is removed on any exception (Ctrl-C, SIGTERM) and swept by the next export when
its process died (SIGKILL). Every reused file is checked against its sha256 before use; a file
that does not match sends its stage back to be redone. Success, ``--fresh`` and
``clear_export_cache`` remove the folder. A lock keeps two exports of the same job apart, and
every path that removes a resume folder's files (``--fresh``, ``cache clear``) takes it first.

``stages.json`` is data, never trusted as paths: each record is type-checked and its file names
must be plain names in the folder; a record that fails is treated as absent (its stage is redone).
Nothing is removed outside the resume folder, and no symlink is followed out of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenvl_edge.bundler.export_target import checked_files, partial_name, sweep_stale
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.paths import cache_root
from qwenvl_edge.runtime.bundle import file_entry

RECORDS = "stages.json"
LOCK = "lock"


def export_cache_root() -> Path:
    return cache_root() / "export"


RECORDS_MAX_BYTES = 1 << 20  # a real stages.json is a few KiB; anything bigger is not ours
STAGE_NAME = re.compile(r"[a-z0-9_]{1,40}")


def real_folder(path: Path, what: str) -> None:
    """Refuse a symbolic link where the tool keeps (and removes) its own files: it must never follow one out."""
    if path.is_symlink():
        raise QwenVLError(f"{path}: the {what} is a symbolic link; qwenvl-edge does not follow it "
                          "(make it a real folder, or remove the link)")


def check_cache_folders() -> None:
    """The cache root and the export folder, which ``cache clear`` empties, must be real folders."""
    root = export_cache_root()
    real_folder(root.parent, "cache folder")
    real_folder(root, "export cache folder")


def remove_entry(path: Path) -> None:
    """Remove one entry of a folder the tool owns; a symlink is removed itself, never what it points to."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows symlinks inside
    else:
        path.unlink(missing_ok=True)


def _empty(folder: Path, keep: tuple[str, ...] = ()) -> None:
    for entry in list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []:
        if entry.name not in keep:
            remove_entry(entry)


def _lock_owner(fd: int) -> str:
    """The PID the lock holder wrote into the lock file (``pid N``), for the refusal message."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {int(text)}" if text.isdigit() else "pid unknown"


def try_lock(folder: Path, create: bool = True) -> int | None:
    """Hold ``folder``'s export lock: its fd, or None when the folder went away (a concurrent clear).

    Raises ``QwenVLError`` (one line) when a live export holds it. The locked file must still be the
    one at ``folder/lock`` afterwards: a ``cache clear`` that removed it in between means "try again".
    """
    real_folder(folder, "export resume folder")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        real_folder(folder, "export resume folder")
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QwenVLError(f"{folder / LOCK}: cannot open the export lock ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _lock_owner(fd)
        os.close(fd)
        raise QwenVLError(f"{folder}: an export of this job is running ({owner}); "
                          "wait for it to end or stop it first") from None
    try:
        same = os.fstat(fd).st_ino == os.stat(folder / LOCK, follow_symlinks=False).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def hold_lock(folder: Path) -> int:
    """``try_lock`` until it holds the lock of a folder that stays (a clear may remove it in between)."""
    for _ in range(100):
        fd = try_lock(folder)
        if fd is not None:
            return fd
        time.sleep(0.01)
    raise QwenVLError(f"{folder}: could not take the export lock (the folder keeps being removed)")


def remove_locked(folder: Path, fd: int) -> None:
    """Remove a resume folder whose lock ``fd`` holds: its files first, the lock file last, then the folder."""
    try:
        _empty(folder, keep=(LOCK,))
        (folder / LOCK).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a new export made its lock in between: the folder is its now
            folder.rmdir()
    finally:
        os.close(fd)


def resume_folders() -> list[Path]:
    """The resume folders under the export cache (real folders only: a symlink in it is not ours)."""
    root = export_cache_root()
    if not root.is_dir() or root.is_symlink():
        return []
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink()]


def check_no_running_export() -> None:
    """Refuse (one line) while a live export holds the lock of any resume folder; remove nothing."""
    check_cache_folders()
    for folder in resume_folders():
        fd = try_lock(folder, create=False)
        if fd is not None:
            os.close(fd)


def clear_export_cache() -> int:
    """Remove every resume folder (``qwenvl-edge`` cache clear); return how many were removed.

    Refuses (one line, nothing removed) while an export holds the lock of any of them, and never
    follows a symlinked cache folder, resume folder or file.
    """
    check_cache_folders()
    held: dict[Path, int] = {}
    try:
        for folder in resume_folders():
            fd = try_lock(folder, create=False)
            if fd is not None:
                held[folder] = fd
    except BaseException:
        for fd in held.values():
            os.close(fd)
        raise
    for folder, fd in held.items():
        remove_locked(folder, fd)
    return len(held)


def job_fingerprint(checkpoint_files: list[Path], options: dict[str, Any]) -> str:
    """A name for one export job: the checkpoint's files (name, size, mtime) and the stage-relevant options.

    The checkpoint's bytes are not hashed (19 GB): a file rewritten in place changes its mtime.
    """
    h = hashlib.sha256()
    for p in sorted(checkpoint_files):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    ckpt = h.hexdigest()[:16]
    opts = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{ckpt}-{opts}"


class StageCache:
    """One job's resume folder; ``run(name, make)`` returns a stage's record, reusing a verified one."""

    def __init__(self, folder: Path, fresh: bool = False, progress: Callable[[str], None] | None = None,
                 reports: dict[str, Callable[[dict[str, Any]], bool]] | None = None):
        self.folder = folder
        self.say = progress or (lambda _m: None)
        self.reports = reports or {}  # stage -> whether a report read back has the shape its users need
        self._lock: int | None = hold_lock(folder)  # first: --fresh must not remove a running export's files
        try:
            if fresh:
                _empty(folder, keep=(LOCK,))
            for stale in sweep_stale(folder, "."):
                self.say(f"resume: removed {stale.name} left by an export that was killed")
            self.records: dict[str, dict[str, Any]] = self._load()
        except BaseException:
            self.close(remove=False)
            raise
        self.reused: list[str] = []

    def _load(self) -> dict[str, dict[str, Any]]:
        """The records on disk, each checked as data; a record (or file) that fails is treated as absent."""
        path = self.folder / RECORDS
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > RECORDS_MAX_BYTES:
                raise ValueError("not a small regular file")
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError):
            self.say(f"resume: {RECORDS} is unreadable or not a stage record; redoing every stage")
            return {}
        if not isinstance(raw, dict):
            self.say(f"resume: {RECORDS} is not a stage record; redoing every stage")
            return {}
        records = {}
        for name, record in raw.items():
            checked = checked_record(name, record)
            if checked is not None and name in self.reports and not self.reports[name](checked["report"]):
                checked = None
            if checked is None:
                self.say(f"resume: the record of stage {str(name)[:40]!r} is not valid; redoing it")
            else:
                records[name] = checked
        return records

    def _save(self) -> None:
        tmp = self.folder / partial_name(RECORDS)
        remove_entry(tmp)  # never write through a link left there
        tmp.write_text(json.dumps(self.records, indent=1), encoding="utf-8")
        os.replace(tmp, self.folder / RECORDS)

    def path(self, name: str) -> Path:
        return self.folder / name

    def _verified(self, name: str) -> dict[str, Any] | None:
        record = self.records.get(name)
        if record is None:
            return None
        for file, entry in record["files"].items():
            if record.get("dropped"):
                break
            path = self.folder / file
            if not _regular_file(path, entry["bytes"]) or file_entry(path) != entry:
                self.say(f"resume: {file} does not match its record; redoing stage {name}")
                self.forget(name)
                return None
        return record

    def forget(self, name: str) -> None:
        record = self.records.pop(name, None)
        for file in (record or {}).get("files", {}):  # plain names (checked_record): inside the folder
            remove_entry(self.folder / file)
        self._save()

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished earlier (its files verified, or dropped after use)."""
        return self._verified(name) is not None

    def dropped(self, name: str) -> bool:
        return bool(self.records.get(name, {}).get("dropped"))

    def run(self, name: str, make: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """The record of stage ``name``: reused when finished and verified, else made.

        ``make(folder)`` writes the stage's files into ``folder`` (a fresh partial folder) and returns
        its report; the files then move into the resume folder and the record is saved.
        """
        record = self._verified(name)
        if record is not None:
            self.reused.append(name)
            self.say(f"resume: stage {name} finished earlier, files verified: reused")
            return record
        work = self.folder / partial_name(name)
        remove_entry(work)
        work.mkdir()
        started = time.monotonic()
        try:
            report = make(work)
            files = {p.name: file_entry(p) for p in sorted(work.iterdir()) if p.is_file()}
            for file in files:
                remove_entry(self.folder / file)  # e.g. a folder of that name (os.replace cannot replace it)
                os.replace(work / file, self.folder / file)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.records[name] = {"files": files, "report": report, "seconds": round(time.monotonic() - started, 3)}
        self._save()
        return self.records[name]

    def drop_files(self, name: str, keep: tuple[str, ...] = ()) -> None:
        """Delete a finished stage's files once no later stage needs them (disk), keeping its record."""
        record = self.records.get(name)
        if record is None:
            return
        for file in record["files"]:
            if file not in keep:
                remove_entry(self.folder / file)
        record["dropped"] = True
        self._save()

    def close(self, remove: bool) -> None:
        """Release the lock; with ``remove``, delete the folder first, while the lock is still held."""
        fd, self._lock = self._lock, None
        if fd is None:
            return
        if remove:
            remove_locked(self.folder, fd)
        else:
            os.close(fd)


def _regular_file(path: Path, size: int) -> bool:
    """A regular file (not a symlink, not a folder) of ``size`` bytes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def checked_record(name: Any, record: Any) -> dict[str, Any] | None:
    """One stage's record from ``stages.json``, type-checked, or None (then the stage is redone)."""
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or not isinstance(record, dict):
        return None
    files = checked_files(record.get("files"), reserved=(RECORDS, LOCK))
    report, seconds, dropped = record.get("report"), record.get("seconds"), record.get("dropped", False)
    if files is None or not isinstance(report, dict) or not isinstance(dropped, bool):
        return None
    if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds < 0:
        return None
    checked = {"files": files, "report": report, "seconds": seconds}
    if dropped:
        checked["dropped"] = True
    return checked
