"""ONNX files on disk, shared by export/ (FP32 graph) and quant/ (INT8 graph): external weight data
written as it is made, and models that appear under their name only when complete.

Above export/ and quant/ so neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from onnx import TensorProto

DATA_ALIGNMENT = 4096  # page-aligned offsets let onnxruntime memory-map the weights


class ExternalDataWriter:
    """Appends raw tensor bytes to one ``.data`` file and points tensor protos at them."""

    def __init__(self, f: BinaryIO, location: str, alignment: int = DATA_ALIGNMENT):
        self.f = f
        self.location = location  # file name as the model refers to it (next to the .onnx)
        self.alignment = alignment
        self.offset = 0

    def store(self, tensor: TensorProto, array: np.ndarray) -> None:
        pad = -self.offset % self.alignment
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # ONNX stores little-endian
        self.f.write(data.data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", data.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.offset += data.nbytes


def external_data_path(model_path: Path) -> Path:
    """Where a model's external weights live: ``<model>.data`` beside it (ORT's quantizer names it so too)."""
    return model_path.with_name(model_path.name + ".data")


@contextlib.contextmanager
def staged_model_files(out_path: Path) -> Iterator[Path]:
    """Yield a path named like ``out_path`` inside a hidden sibling folder; when the block succeeds,
    move it and its ``.data`` (if any) into place, data first; whatever happens, remove the folder.
    So a model is never seen half-written, and a stale ``.data`` from an earlier run goes away."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        yield staged
        if external_data_path(staged).exists():
            os.replace(external_data_path(staged), external_data_path(out_path))
        else:
            external_data_path(out_path).unlink(missing_ok=True)
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def relocate_model(src: Path, dst: Path, entries: dict[str, dict]) -> dict[str, dict]:
    """Rename a model and its ``.data`` (rewriting the data's file name inside the graph); return the file
    entries (bytes, sha256) under the new names: the ``.data`` keeps its entry, the graph is re-hashed."""
    import hashlib

    import onnx

    entries = dict(entries)
    src_data, dst_data = external_data_path(src), external_data_path(dst)
    model = onnx.load(str(src), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == src_data.name:
                entry.value = dst_data.name
    if src_data.exists():
        os.replace(src_data, dst_data)
        entries[dst_data.name] = entries.pop(src_data.name)
    data = model.SerializeToString()
    dst.write_bytes(data)
    src.unlink()
    entries.pop(src.name, None)
    entries[dst.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return entries
