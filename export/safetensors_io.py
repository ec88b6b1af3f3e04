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
    """Lazy records of every tensor in one ``.safetensors`` file, each entry checked against the data area."""
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_start, data_size = 8 + n, size - 8 - n
    records: dict[str, TensorRecord] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, info, data_size)
        rec = TensorRecord(name, path, dtype, shape, data_start + begin, (end - begin) // RAW_DTYPES[dtype].itemsize)
        if rec.nbytes != end - begin:
            raise CheckpointError(f"{path}: tensor {name} shape {list(shape)} does not match its "
                                  f"{end - begin} bytes")
        rec.check_bounds(size)
        records[name] = rec
        if end > begin:  # empty tensors take no bytes and overlap nothing
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a} and {b} overlap in the data area")
    return records


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, info: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or a one-line refusal naming the tensor."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt header entry for {name}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise CheckpointError(f"{path}: corrupt header entry for {name}")
    if dtype not in RAW_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype:.20}; expected BF16, F16 or F32")
    if len(shape) > 8 or not all(_is_int(d) and 0 <= d <= 2**40 for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has an invalid shape {shape!r:.60}")
    if len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name} has invalid data_offsets {offsets!r:.60}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{path}: tensor {name} data_offsets [{begin}, {end}] lie outside the "
                              f"{data_size}-byte data area")
    return dtype, tuple(shape), begin, end


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
