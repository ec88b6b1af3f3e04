"""Image rows cached by (vision model checksum, image content hash), in memory and on disk.

A second question about the same photo, in the same chat or in a later ``run``, skips the
encoder. The key is the image's own bytes (or decoded pixels for an in-memory image), never
the placeholder token ids, so two photos can never be mistaken for each other; the vision
model's checksum is part of the key, so re-exporting the bundle invalidates old rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def image_key(image: Path | str | Image.Image) -> str:
    """sha256 of the file's bytes, or of mode + size + pixels for an in-memory image."""
    digest = hashlib.sha256()
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
    else:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwenvl-edge" / "image-rows"


class ImageEmbeddingCache:
    """LRU in memory (``max_items``) backed by ``.npy`` files under ``folder/<model>/``; folder None = memory only."""

    def __init__(self, model_sha256: str, folder: Path | None = None, max_items: int = 16):
        self.model = model_sha256[:16]
        self.folder = Path(folder) / self.model if folder is not None else None
        self.max_items = max_items
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        rows = self._rows.get(key)
        if rows is None and self.folder is not None:
            path = self.folder / f"{key}.npy"
            try:
                rows = np.load(path, allow_pickle=False) if path.is_file() else None
            except (OSError, ValueError):
                log.warning("ignoring unreadable cached rows %s", path)
                rows = None
        if rows is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(key, rows)
        return rows

    def put(self, key: str, rows: np.ndarray) -> None:
        self._remember(key, rows)
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.npy"
            np.save(tmp, rows, allow_pickle=False)
            tmp.replace(self.folder / f"{key}.npy")
        except OSError as e:  # a read-only or full disk must not break answering
            log.warning("cannot cache image rows in %s: %s", self.folder, e)

    def _remember(self, key: str, rows: np.ndarray) -> None:
        self._rows[key] = rows
        self._rows.move_to_end(key)
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)
