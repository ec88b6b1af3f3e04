"""Which ``qwenvl-edge serve`` runs on which bundle: one state file per bundle, locked by its server.

Every server takes an exclusive ``flock`` on ``$XDG_STATE_HOME/qwenvl-edge/servers/<bundle>-<hash>.json``
before it binds its port, writes its pid, URL, bundle and manifest sha256 into it, holds the lock for its
whole life and deletes the file when it stops. The kernel drops the lock when the process dies however it
dies (SIGKILL included), so a state file nobody holds is stale whatever pid it names: no pid-reuse guessing,
and ``run``, ``chat``, ``ps`` and ``stop`` ignore it. A second server on the same bundle finds the lock
taken and refuses to start.

Stdlib only (the CLI reads it for ``run`` and ``ps`` without the server extra); POSIX (``fcntl``): without
it no server is registered and ``run`` / ``chat`` load in process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from qwenvl_edge.contract import MANIFEST_FILE
from qwenvl_edge.errors import QwenVLError

try:
    import fcntl
except ImportError:  # no flock (Windows): servers are not registered, run and chat load in process
    fcntl = None
from qwenvl_edge.paths import servers_dir

STATE_VERSION = 1
CLAIM_TRIES = 20  # a reader's probe holds a shared lock for microseconds: retry rather than refuse


def bundle_key(folder: Path) -> str:
    """A file name for the bundle folder: its name (readable in ``ls``) and a hash of its resolved path."""
    resolved = str(Path(folder).expanduser().resolve())
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(resolved).name)[:40] or "bundle"
    return f"{name}-{hashlib.sha256(resolved.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


def manifest_sha256(folder: Path) -> str | None:
    """The sha256 of the bundle's manifest (which names every file's sha256): a re-export changes it.
    None when the folder holds no readable manifest."""
    try:
        return hashlib.sha256((Path(folder).expanduser() / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def state_path(folder: Path) -> Path:
    return servers_dir() / f"{bundle_key(folder)}.json"


def log_path(folder: Path) -> Path:
    """Where ``serve --background`` writes the server's stdout and stderr (appended, one file per bundle)."""
    return servers_dir() / f"{bundle_key(folder)}.log"


@dataclass(frozen=True)
class Server:
    """One running server, as its state file says."""

    path: Path
    pid: int
    url: str
    bundle: str
    manifest_sha256: str | None
    info: dict

    @property
    def port(self) -> int:
        return int(self.info.get("port", 0))


class Claim:
    """The lock on one bundle's state file, held by the server that runs on it (released on exit)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def publish(self, info: dict) -> None:
        """Write the server's facts into the locked file (in place: the lock is on this inode)."""
        data = json.dumps({"version": STATE_VERSION, **info}, indent=1).encode() + b"\n"
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Delete the state file, then drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def claim(folder: Path) -> Claim:
    """The bundle's state file, locked for this process; refuses (one line, exit 2) when a live server holds it."""
    path = state_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwenVLError(f"cannot create {path.parent} for the server's state file ({e.strerror or e})") from None
    for _ in range(CLAIM_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if fcntl is None:
            return Claim(path, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            time.sleep(0.05)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file a stopping server unlinked after we opened it
            return Claim(path, fd)
        os.close(fd)
    running = read(path)
    where = f" (pid {running.pid}, {running.url})" if running else ""
    raise QwenVLError(f"a server for the bundle {Path(folder).expanduser().resolve()} is already running{where}: "
                      "use it, or stop it first with `qwenvl-edge stop`")


def held(path: Path) -> bool:
    """Whether a live server holds ``path``'s lock (a probe with a shared lock: granted means nobody holds it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock


def read(path: Path) -> Server | None:
    """The live server of one state file, or None (stale: its server died; or still being written)."""
    if not held(path):
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return Server(path, int(info["pid"]), str(info["url"]), str(info["bundle"]), info.get("manifest_sha256"),
                      info)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_files() -> list[Path]:
    """State files no live server holds (a server killed with SIGKILL leaves one)."""
    folder = servers_dir()
    return sorted(p for p in folder.glob("*.json") if not held(p)) if folder.is_dir() else []


def live_servers() -> list[Server]:
    """Every running server of this user, oldest first."""
    folder = servers_dir()
    if not folder.is_dir():
        return []
    found = [s for s in map(read, sorted(folder.glob("*.json"))) if s is not None]
    return sorted(found, key=lambda s: s.info.get("started", 0))


def server_for(folder: Path) -> Server | None:
    """The live server on this bundle folder, if any."""
    return read(state_path(folder))
