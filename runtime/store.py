"""One checked on-disk store for what is expensive to recompute: image rows and KV prefix states.

Every entry is one file ``<kind>/<key[:2]>/<key>.qvl``: a magic line, a JSON header (kind, key,
owner: the sha256 of the bundle part that made it, dtype, shape, byte count, sha256 of the payload)
and the payload. ``get`` checks all of it (and, for float rows, that every value is finite) before
anything is returned; an entry that fails any check (another model's entry too), is unreadable,
or is a folder where a file should be is removed and reported as a miss, so the caller recomputes
and rewrites it: nothing on disk is ever trusted. Writes go to a temp file in the same folder and
are renamed into place (removed on any failure), so a crash leaves no half-written entry. The store
is bounded: when it grows over ``max_bytes`` the least recently used entries go first. It lives
under ``$XDG_CACHE_HOME/qwenvl-edge/`` (default ``~/.cache``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenvl_edge.paths import cache_root

log = logging.getLogger(__name__)

MAGIC = b"QWENVL-EDGE-STORE 1\n"
SUFFIX = ".qvl"
MAX_HEADER = 4096
DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
DEFAULT_MAX_BYTES = 4 << 30  # a 7B prefix state is ~150 MB; image rows 4 MB
KINDS = ("rows", "prefix")


class BadEntry(ValueError):
    """An entry that failed a check (the message says which)."""


def default_store_dir() -> Path:
    """``$XDG_CACHE_HOME/qwenvl-edge`` (``~/.cache/qwenvl-edge`` when unset)."""
    return cache_root()


def entry_key(*parts: str | bytes) -> str:
    """A store key: sha256 over the parts, each length-prefixed so no two part lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def encode_entry(kind: str, key: str, array: np.ndarray, owner: str = "") -> bytes:
    """The bytes of one entry file; ``owner`` names the model that made it (see ``decode_entry``)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in DTYPES:
        raise ValueError(f"cannot store dtype {array.dtype}")
    payload = array.tobytes()
    header = {"kind": kind, "key": key, "owner": owner, "dtype": array.dtype.name, "shape": list(array.shape),
              "nbytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


@dataclass(frozen=True)
class Expect:
    """What the caller needs: the dtype, and the shape (``None`` in a place = any size there)."""

    dtype: str
    shape: tuple[int | None, ...]
    finite: bool = False


def decode_entry(blob: bytes, kind: str, key: str, expect: Expect, owner: str = "") -> np.ndarray:
    """Check one entry's bytes and return its array; ``BadEntry`` says what is wrong.

    ``owner`` (a bundle part's sha256) must be the one the entry was written with: a file copied from
    another bundle's store, its key rewritten to match, is still another model's rows or KV state.
    """
    if not blob.startswith(MAGIC):
        raise BadEntry("not a store entry (magic)")
    end = blob.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise BadEntry("header missing or too long")
    try:
        header = json.loads(blob[len(MAGIC):end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadEntry("header is not JSON") from None
    if not isinstance(header, dict):
        raise BadEntry("header is not an object")
    payload = blob[end + 1:]
    shape = header.get("shape")
    if header.get("kind") != kind or header.get("key") != key:
        raise BadEntry("entry belongs to another key")
    if header.get("owner") != owner:
        raise BadEntry("entry was written by another model (bundle)")
    if header.get("dtype") != expect.dtype or expect.dtype not in DTYPES:
        raise BadEntry(f"dtype {header.get('dtype')!r}, want {expect.dtype}")
    if (not isinstance(shape, list) or len(shape) != len(expect.shape)
            or not all(type(n) is int and n >= 0 for n in shape)
            or any(want is not None and n != want for n, want in zip(shape, expect.shape, strict=True))):
        raise BadEntry(f"shape {shape!r}, want {list(expect.shape)}")
    itemsize = np.dtype(DTYPES[expect.dtype]).itemsize
    if header.get("nbytes") != len(payload) or int(np.prod(shape, dtype=np.int64)) * itemsize != len(payload):
        raise BadEntry(f"{len(payload)} payload bytes do not match the header")
    if header.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise BadEntry("checksum differs: the payload was changed")
    array = np.frombuffer(payload, dtype=DTYPES[expect.dtype]).reshape(shape)
    if expect.finite and not np.isfinite(array).all():
        raise BadEntry("non-finite values")
    return array


class Store:
    """The checked, bounded store; ``folder=None`` stores nothing (every ``get`` misses)."""

    def __init__(self, folder: Path | str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.max_bytes = max_bytes
        self.dropped = 0  # bad entries removed since this store was opened

    def path(self, kind: str, key: str) -> Path:
        if kind not in KINDS or len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"bad store address {kind}/{key}")
        assert self.folder is not None
        return self.folder / kind / key[:2] / f"{key}{SUFFIX}"

    def get(self, kind: str, key: str, expect: Expect, owner: str = "") -> np.ndarray | None:
        """The checked array written by ``owner``, or None (missing or bad: a bad entry is removed)."""
        if self.folder is None:
            return None
        path = self.path(kind, key)
        if not os.path.lexists(path):
            return None
        try:
            if path.is_symlink() or not path.is_file():
                raise BadEntry("not a regular file")
            blob = path.read_bytes()
            array = decode_entry(blob, kind, key, expect, owner)
        except (OSError, BadEntry) as e:
            log.warning("dropping bad cache entry %s: %s", path, e)
            self.dropped += 1
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return array

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry file is there (unchecked: ``get`` checks it)."""
        return self.folder is not None and self.path(kind, key).is_file()

    def drop(self, kind: str, key: str) -> None:
        """Remove an entry that its user found bad (e.g. llama.cpp refused a state)."""
        if self.folder is not None:
            self.dropped += 1
            self._remove(self.path(kind, key))

    def put(self, kind: str, key: str, array: np.ndarray, owner: str = "") -> None:
        """Write ``owner``'s entry atomically, then evict old ones over the bound; disk errors are logged,
        never raised."""
        if self.folder is None:
            return
        path = self.path(kind, key)
        blob = encode_entry(kind, key, array, owner)
        tmp = None
        try:
            if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
                self._remove(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:  # a read-only or full disk must not break answering
            log.warning("cannot write cache entry %s: %s", path, e)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._evict()

    def _entries(self, kinds: tuple[str, ...] = KINDS) -> list[tuple[float, int, Path]]:
        out = []
        if self.folder is None:
            return out
        for kind in kinds:
            for path in (self.folder / kind).glob(f"*/*{SUFFIX}"):
                if path.name.startswith("."):  # a write in progress
                    continue
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    out.append((st.st_mtime, st.st_size, path))
        return out

    def _evict(self) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            self._remove(path)
            total -= size

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def size(self, kind: str | None = None) -> tuple[int, int]:
        """(entries, bytes) on disk, of one kind or of all."""
        entries = self._entries(_kinds(kind))
        return len(entries), sum(size for _, size, _ in entries)

    def clear(self, kind: str | None = None) -> int:
        """Remove every entry of one kind or of all (and stray temp files); return how many entries went."""
        entries = self._entries(_kinds(kind))
        for _, _, path in entries:
            self._remove(path)
        if self.folder is not None:
            for each in _kinds(kind):
                for tmp in (self.folder / each).glob(f"*/.tmp-*{SUFFIX}"):
                    self._remove(tmp)
        return len(entries)


def _kinds(kind: str | None) -> tuple[str, ...]:
    if kind is None:
        return KINDS
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind!r}")
    return (kind,)
