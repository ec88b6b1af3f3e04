"""Open a Qwen-VL checkpoint folder: config, shard index, lazy tensors; no torch.

Accepts every layout a downloaded copy comes in: ``pytorch_model-*.bin`` shards with
``pytorch_model.bin.index.json`` (the official one), ``model-*.safetensors`` with
``model.safetensors.index.json``, or one unsharded ``model.safetensors`` /
``pytorch_model.bin``. Every tensor the architecture needs is checked against the shape
the config implies when the folder is opened, so the exporters never meet a surprise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.safetensors_io import read_safetensors
from qwenvl_edge.export.tensor_record import TensorRecord
from qwenvl_edge.export.torch_zip_io import read_torch_zip
from qwenvl_edge.validate import json_file, plain_name

log = logging.getLogger(__name__)

# (index file, unsharded file) per format, in the order we look for them
LAYOUTS = [
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
]


def _read_shard(path: Path) -> dict[str, TensorRecord]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing shard")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_zip(path)


def _weight_files(folder: Path) -> list[Path]:
    for index_name, single_name in LAYOUTS:
        index = folder / index_name
        if index.is_file():
            data = json_file(index, CheckpointError, "shard index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: not a shard index (weight_map is not a mapping of tensor "
                                      "name to file)")
            names = dict.fromkeys(plain_name(f, str(index), CheckpointError) for f in weight_map.values())
            return [folder / f for f in names]
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise CheckpointError(f"{folder}: no weights (expected {', '.join(n for pair in LAYOUTS for n in pair)})")


class CheckpointReader:
    """Config plus a name -> lazy tensor table over all shards of one folder."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder")
        self.config = QwenConfig.from_file(self.folder / "config.json")
        self.files = _weight_files(self.folder)
        self.records: dict[str, TensorRecord] = {}
        for path in self.files:
            for name, rec in _read_shard(path).items():
                if name in self.records:
                    raise CheckpointError(f"{path}: tensor {name} also in {self.records[name].path.name}")
                self.records[name] = rec
        self._check_tensors()

    def _check_tensors(self) -> None:
        expected = self.config.tensor_shapes()
        for name, shape in expected.items():
            rec = self.records.get(name)
            if rec is None:
                raise CheckpointError(f"{self.folder}: tensor {name} is missing (looked in "
                                      f"{', '.join(p.name for p in self.files)})")
            if rec.shape != shape:
                raise CheckpointError(f"{rec.path}: tensor {name} has shape {list(rec.shape)}, "
                                      f"config.json implies {list(shape)}")
        extra = sorted(set(self.records) - set(expected))
        if extra:
            log.warning("ignoring %d tensor(s) not in the architecture, e.g. %s", len(extra), extra[0])

    @property
    def tiktoken_path(self) -> Path:
        path = self.folder / "qwen.tiktoken"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing: the tokenizer file ships with Qwen-VL-Chat")
        return path

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.config.tensor_shapes() if n.startswith(prefix)]

    def record(self, name: str) -> TensorRecord:
        try:
            return self.records[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing") from None

    def tensor(self, name: str) -> np.ndarray:
        """A float32 copy of one tensor; read lazily from its memory-mapped shard."""
        return self.record(name).f32()

    def iter_tensors(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names(prefix):
            yield name, self.tensor(name)
