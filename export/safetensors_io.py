"""Safetensors by its header: 8-byte length, JSON, then raw little-endian data.

Reading parses only the header and returns lazy records; writing streams one tensor at a
time, so a 19 GB checkpoint never sits in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export.tensor_record import RAW_DTYPES, TensorRecord

MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors(path: Path) -> dict[str, TensorRecord]:
    """Lazy records of every tensor in one ``.safetensors`` file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not safetensors (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    records: dict[str, TensorRecord] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from None
        if dtype not in RAW_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; expected BF16, F16 or F32")
        itemsize = RAW_DTYPES[dtype].itemsize
        numel = (end - begin) // itemsize
        rec = TensorRecord(name, path, dtype, shape, 8 + n + begin, numel)
        if rec.nbytes != end - begin:
            raise CheckpointError(f"{path}: tensor {name} shape {list(shape)} does not match its "
                                  f"{end - begin} bytes")
        rec.check_bounds(size)
        records[name] = rec
    return records


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                      make_bits: Callable[[str], np.ndarray], dtype: str = "BF16",
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors in ``shapes`` order, asking ``make_bits(name)`` for each one in turn."""
    itemsize = RAW_DTYPES[dtype].itemsize
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            _write_array(f, make_bits(name), shape, RAW_DTYPES[dtype], name)


def _write_array(f, arr: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
        raise ValueError(f"{name}: got {arr.dtype} {arr.shape}, planned {dtype} {shape}")
    f.write(np.ascontiguousarray(arr).data)


def total_bytes(shapes: Iterable[tuple[int, ...]], itemsize: int = 2) -> int:
    return sum(itemsize * int(np.prod(s, dtype=np.int64)) for s in shapes)
