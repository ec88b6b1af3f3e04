"""A tiny GGUF metadata reader: the key/value section only, so the runtime can check a GGUF before llama.cpp maps it.

Why not the ``gguf`` package: the runtime installs only numpy, Pillow, onnxruntime and llama-cpp-python.
Why not llama.cpp: it loads (and for a wrong architecture, builds the wrong graph over) gigabytes of
weights before anything can be compared. The reader is bounded for hostile files: every length is checked
against the file's size, and it stops as soon as the wanted keys are found.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from qwenvl_edge.errors import BundleError

MAGIC = b"GGUF"
MAX_KEY_BYTES = 1 << 16
MAX_KV = 1 << 20
# GGUF value type -> struct format of a scalar (8 = string, 9 = array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise BundleError(f"{self.path}: truncated GGUF header")
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> bytes:
        n = self.unpack("<Q")
        if limit is not None and n > limit:
            raise BundleError(f"{self.path}: corrupt GGUF header (a {n}-byte key)")
        return self.take(n)

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        if self.f.tell() + n > self.size:
            raise BundleError(f"{self.path}: truncated GGUF header")
        self.f.seek(n, 1)

    def pick_strings(self, kind: int, wanted: set[int]) -> dict[int, str]:
        """The items ``wanted`` of a string array (the rest skipped); {} for any other kind of value."""
        if kind != ARRAY:
            self.value(kind, False)
            return {}
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item != STRING:
            self.skip_array(item, count)
            return {}
        if count > self.size:
            raise BundleError(f"{self.path}: corrupt GGUF header (array of {count} strings)")
        out = {}
        for i in range(count):
            if i in wanted:
                out[i] = self.string().decode("utf-8", "replace")
            else:
                self.skip_string()
        return out

    def value(self, kind: int, keep: bool) -> Any:
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == STRING:
            raw = self.string()
            return raw.decode("utf-8", "replace") if keep else None
        if kind == ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            self.skip_array(item, count)
            return count  # arrays are reported by their length (e.g. the vocabulary size)
        raise BundleError(f"{self.path}: corrupt GGUF header (value type {kind})")

    def skip_array(self, item: int, count: int) -> None:
        if item in SCALARS:
            nbytes = count * struct.calcsize(SCALARS[item])
            if self.f.tell() + nbytes > self.size:
                raise BundleError(f"{self.path}: truncated GGUF header")
            self.f.seek(nbytes, 1)
        elif item == STRING:
            if count > self.size:
                raise BundleError(f"{self.path}: corrupt GGUF header (array of {count} strings)")
            for _ in range(count):
                self.skip_string()
        else:
            raise BundleError(f"{self.path}: corrupt GGUF header (array of type {item})")


def _open_header(f: BinaryIO, path: Path) -> tuple[_Reader, int]:
    """The reader after the fixed header, and the number of key/value pairs."""
    r = _Reader(f, path.stat().st_size, path)
    if r.take(4) != MAGIC:
        raise BundleError(f"{path}: not a GGUF file")
    version = r.unpack("<I")
    if version not in (2, 3):
        raise BundleError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    r.unpack("<Q")  # tensor count
    n_kv = r.unpack("<Q")
    if n_kv > MAX_KV:
        raise BundleError(f"{path}: corrupt GGUF header ({n_kv} metadata keys)")
    return r, n_kv


def _scan(path: Path, visit: Callable[[_Reader, str, int], bool]) -> None:
    """Walk the header's key/value entries: ``visit(reader, key, kind)`` reads or skips the value and says
    whether to stop; a file that cannot be read is one ``BundleError``."""
    try:
        with open(path, "rb") as f:
            r, n_kv = _open_header(f, path)
            for _ in range(n_kv):
                key = r.string(MAX_KEY_BYTES).decode("utf-8", "replace")
                if visit(r, key, r.unpack("<I")):
                    return
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror or e})") from None


def read_gguf_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The GGUF's key/value metadata (arrays as their lengths); stops early once every ``wanted`` key is read."""
    out: dict[str, Any] = {}

    def visit(r: _Reader, key: str, kind: int) -> bool:
        out[key] = r.value(kind, wanted is None or key in wanted)
        return wanted is not None and wanted <= out.keys()

    _scan(Path(path), visit)
    return out


def read_gguf_tokens(path: Path, wanted: set[str]) -> dict[str, str]:
    """Items of string arrays named ``"key[i]"`` (e.g. ``tokenizer.ggml.tokens[7]``: the text of token 7);
    an item the file does not have is left out."""
    picks: dict[str, set[int]] = {}
    for name in wanted:
        key, _, index = name.rpartition("[")
        picks.setdefault(key, set()).add(int(index.rstrip("]")))
    out: dict[str, str] = {}

    def visit(r: _Reader, key: str, kind: int) -> bool:
        if key not in picks:
            r.value(kind, False)
            return False
        out.update({f"{key}[{i}]": text for i, text in r.pick_strings(kind, picks.pop(key)).items()})
        return not picks

    _scan(Path(path), visit)
    return out
