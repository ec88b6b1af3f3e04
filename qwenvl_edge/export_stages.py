"""The resume folder: finished export stages kept in the user's cache so an interrupted export resumes.

``$XDG_CACHE_HOME/qwenvl-edge/export/<fingerprint>-<options>/`` (never beside OUT) holds each
finished stage's files and a record (``stages.json``: files with size and sha256, the stage's
report). A stage is written into ``.NAME.partial-PID`` inside it and only recorded when complete;
its partial folder is removed on any exception (Ctrl-C, SIGTERM) and swept by the next export when
its process died (SIGKILL). Every reused file is checked against its sha256 before use; a file
that does not match sends its stage back to be redone. Success, ``--fresh`` and
``clear_export_cache`` remove the folder. A lock keeps two exports of the same job apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export_target import partial_name, sweep_stale
from qwenvl_edge.runtime.bundle import file_entry

RECORDS = "stages.json"
LOCK = "lock"


def export_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwenvl-edge" / "export"


def clear_export_cache() -> int:
    """Remove every resume folder (``qwenvl-edge`` cache clear); return how many were removed."""
    root = export_cache_root()
    folders = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)


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

    def __init__(self, folder: Path, fresh: bool = False, progress: Callable[[str], None] | None = None):
        self.folder = folder
        self.say = progress or (lambda _m: None)
        if fresh and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / LOCK, "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise QwenVLError(f"{folder}: another export of this checkpoint with these options is running") from None
        for stale in sweep_stale(folder, "."):
            self.say(f"resume: removed {stale.name} left by an export that was killed")
        self.records: dict[str, dict[str, Any]] = self._load()
        self.reused: list[str] = []

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            records = json.loads((self.folder / RECORDS).read_text(encoding="utf-8"))
            return records if isinstance(records, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        tmp = self.folder / partial_name(RECORDS)
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
            if not path.is_file() or path.stat().st_size != entry["bytes"] or file_entry(path) != entry:
                self.say(f"resume: {file} does not match its record; redoing stage {name}")
                self.forget(name)
                return None
        return record

    def forget(self, name: str) -> None:
        record = self.records.pop(name, None)
        for file in (record or {}).get("files", {}):
            (self.folder / file).unlink(missing_ok=True)
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
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        started = time.monotonic()
        try:
            report = make(work)
            files = {p.name: file_entry(p) for p in sorted(work.iterdir()) if p.is_file()}
            for file in files:
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
                (self.folder / file).unlink(missing_ok=True)
        record["dropped"] = True
        self._save()

    def close(self, remove: bool) -> None:
        self._lock.close()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
