"""A lazy tensor: where its bytes lie in a file, read through a memory map only when asked.

Both weight formats (safetensors, torch zip) reduce to this record, so the rest of the
export never knows which one it reads, and only one tensor at a time is in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from qwenvl_edge.errors import CheckpointError

BF16 = gguf.GGMLQuantizationType.BF16

# stored dtype name -> numpy dtype of the raw elements (bf16 kept as its uint16 bit patterns)
RAW_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exactly (gguf's BF16 dequantizer: bf16 is the top half of an f32)."""
    flat = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    if flat.size == 0:  # gguf's dequantizer cannot reshape an empty tensor
        return np.empty(np.shape(bits), dtype=np.float32)
    return gguf.quants.dequantize(flat.view(np.uint8), BF16).reshape(np.shape(bits))


def f32_to_bf16_bits(x: np.ndarray, block: int = 1 << 24) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch and ggml do (gguf's quantizer).

    Works in blocks so a 2.5 GB float32 tensor needs no full-size temporaries.
    """
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for start in range(0, flat.size, block):
        out[start:start + block] = gguf.quants.quantize(flat[start:start + block], BF16).view(np.uint16)
    return out.reshape(np.shape(x))


@dataclass(frozen=True)
class TensorRecord:
    """One tensor inside a weight file; nothing is read until ``raw()`` or ``f32()``."""

    name: str
    path: Path
    dtype: str  # "BF16" | "F16" | "F32"
    shape: tuple[int, ...]
    offset: int  # byte offset of the storage's first element in the file
    storage_numel: int  # elements the storage holds (>= what the view needs)
    storage_offset: int = 0  # in elements, torch views only
    stride: tuple[int, ...] | None = None  # None: contiguous row-major

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * RAW_DTYPES[self.dtype].itemsize

    def check_bounds(self, file_size: int) -> None:
        """Catch a truncated file at open time, naming it, instead of a SIGBUS later."""
        end = self.offset + self.storage_numel * RAW_DTYPES[self.dtype].itemsize
        if end > file_size:
            raise CheckpointError(f"{self.path}: truncated: tensor {self.name} needs bytes up to {end}, "
                                  f"file has {file_size}")
        if self.numel and self.storage_offset + self.last_element + 1 > self.storage_numel:
            raise CheckpointError(f"{self.path}: tensor {self.name} {self.shape} overruns its storage")

    @property
    def last_element(self) -> int:
        """Index, past ``storage_offset``, of the last element the view reads (``numel - 1`` when contiguous)."""
        if self.stride is None:
            return self.numel - 1
        return sum((d - 1) * s for d, s in zip(self.shape, self.stride, strict=True))

    def raw(self) -> np.ndarray:
        """The stored elements as a read-only array (BF16 as uint16 bits), memory-mapped."""
        dt = RAW_DTYPES[self.dtype]
        if self.storage_numel == 0 or self.numel == 0:
            return np.zeros(self.shape, dtype=dt)
        storage = np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(self.storage_numel,))
        if self.stride is None:
            return storage[self.storage_offset:self.storage_offset + self.numel].reshape(self.shape)
        strides = tuple(s * dt.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(storage[self.storage_offset:], shape=self.shape,
                                               strides=strides, writeable=False)
        return np.ascontiguousarray(view)

    def f32(self) -> np.ndarray:
        """A float32 copy of the tensor (the only form the exporters compute with)."""
        raw = self.raw()
        if self.dtype == "BF16":
            return bf16_bits_to_f32(raw)
        return raw.astype(np.float32)

    def bf16_bits(self) -> np.ndarray:
        """The tensor as bf16 bit patterns (what the golden checksums hash)."""
        raw = self.raw()
        return np.ascontiguousarray(raw) if self.dtype == "BF16" else f32_to_bf16_bits(raw.astype(np.float32))
