"""The tiny trained Qwen-VL (issue 15): shipped weights -> a full Qwen-VL-Chat checkpoint folder.

``training/train.py`` trains a Qwen-VL-architecture model on the synthetic colour / sign /
grounding tasks (``qwenvl_edge.evaluation.task_images``). Only the rows of the 151,936-token vocabulary
that the tasks use are trained; every other row of ``transformer.wte`` and ``lm_head`` stays
at a seeded value (``frozen_rows``) so the shipped file holds just the trained tensors
(``data/tiny_trained.npz``, bf16 bit patterns, a few MB). ``write_tiny_trained`` regenerates
the frozen rows from the seed and writes the checkpoint with the project's own writer, so it
exports like any Qwen-VL-Chat folder.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export.tensor_record import bf16_bits_to_f32

DATA = Path(__file__).resolve().parent / "data" / "tiny_trained.npz"
VOCAB_TABLES = ("transformer.wte.weight", "lm_head.weight")
FROZEN_STD = 0.02  # small, so an untrained lm_head row never outscores a trained answer token


def frozen_rows(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The seeded float32 table an untrained vocabulary row keeps: N(0, 0.02) from (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    table = rng.standard_normal(shape, dtype=np.float32)
    table *= np.float32(FROZEN_STD)
    return table


def load_shipped(path: Path = DATA) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of the shipped file: meta has the config overrides, seed and trained token ids."""
    if not path.is_file():
        raise QwenVLError(f"{path}: the tiny trained weights are missing from this install")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    return meta, arrays


def tensor_source(meta: dict, arrays: dict[str, np.ndarray]) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """name, shape -> float32 values of the full checkpoint (trained tensors, frozen rows from the seed)."""
    ids = np.asarray(meta["trained_ids"], dtype=np.int64)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name in VOCAB_TABLES:
            table = frozen_rows(name, shape, meta["seed"])
            table[ids] = bf16_bits_to_f32(arrays[name + "#rows"]).reshape(len(ids), shape[1])
            return table
        return bf16_bits_to_f32(arrays[name]).reshape(shape)

    return make


def write_tiny_trained(out: Path, fmt: str = "safetensors", tiktoken: Path | None = None,
                       progress: Callable[[str], None] | None = None, path: Path = DATA) -> Path:
    """Rebuild the full trained checkpoint folder (about 160 MB in bf16) from the shipped file."""
    from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint

    meta, arrays = load_shipped(path)
    return write_checkpoint(Path(out), "tiny", meta["seed"], fmt, None, tiktoken, meta["overrides"], progress,
                            tensors=tensor_source(meta, arrays))
