"""Image -> its rows: content key, rows cache (memory + checked store), onnxruntime session.

The session opens on the first image that is in neither cache, and with ``keep_vision=False`` it
is freed right after each encode (so it never shares memory with the decoder on small devices).
Rows are stored under the vision model's checksum and the image's content hash: re-exporting the
bundle invalidates them, and two photos can never be mistaken for each other.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from qwenvl_edge.errors import BundleError
from qwenvl_edge.runtime.preprocess import ImageData, ImageSpec
from qwenvl_edge.runtime.results import Timings
from qwenvl_edge.runtime.store import Expect, Store, entry_key


class ImageEncoder:
    """Rows ``(n_queries, hidden)`` float32 for an ``ImageData``, from memory, the store or the encoder.

    ``spec``: the bundle's side and mean/std (``ModelInfo.image_spec``); the vision graph must take that side.
    """

    def __init__(self, vision_path: Path, vision_sha256: str, hidden_size: int, n_queries: int, spec: ImageSpec,
                 store: Store, n_threads: int | None = None, keep_vision: bool = True, memory_items: int = 16):
        self.path = vision_path
        # the rows' identity: the vision model and the pixels it was fed (two bundles sharing vision.onnx but
        # not the side or mean/std give other rows, so they must not share cache entries)
        self.model = f"{vision_sha256}:{spec.size}:{list(spec.mean)}:{list(spec.std)}"
        self.hidden_size = hidden_size
        self.n_queries = n_queries
        self.spec = spec
        self.store = store
        self.n_threads = n_threads
        self.keep_vision = keep_vision
        self.memory_items = memory_items
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._session = None
        self._lock = threading.RLock()  # sessions of a batched server share one encoder

    def _key(self, image_key: str) -> str:
        return entry_key("rows", self.model, image_key)

    def cached(self, image_key: str) -> np.ndarray | None:
        """Rows seen before (this process, or a checked store entry), else None."""
        with self._lock:
            return self._cached(image_key)

    def _cached(self, image_key: str) -> np.ndarray | None:
        rows = self._memory.get(image_key)
        if rows is None:
            rows = self.store.get("rows", self._key(image_key),
                                  Expect("float32", (self.n_queries, self.hidden_size), finite=True),
                                  owner=f"vision:{self.model}")  # rows of another bundle's model: a miss
        if rows is not None:
            self._remember(image_key, rows)
        return rows

    def rows(self, image: ImageData, timings: Timings | None = None) -> np.ndarray:
        """The image's rows: cached, or encoded now (and stored)."""
        with self._lock:  # one encode at a time; a second request for the same photo then finds it cached
            return self._rows(image, timings)

    def _rows(self, image: ImageData, timings: Timings | None) -> np.ndarray:
        rows = self._cached(image.key)
        if rows is not None:
            if timings:
                timings.images_from_cache += 1
            return rows
        from qwenvl_edge.runtime.preprocess import preprocess_image

        started = time.perf_counter()
        pixels = preprocess_image(image.image, self.spec)  # (3, S, S)
        rows = self.session().encode(pixels[None])[0]  # (n_queries, hidden)
        if not self.keep_vision:
            self.release()
        self._remember(image.key, rows)
        self.store.put("rows", self._key(image.key), rows, owner=f"vision:{self.model}")
        if timings:
            timings.image_encode_s += time.perf_counter() - started
            timings.images_encoded += 1
        return rows

    def session(self):
        """The onnxruntime session, opened on first use and checked against the decoder's width."""
        if self._session is None:
            from qwenvl_edge.runtime.vision import VisionEncoder

            # a session freed after its encode never repays prepacking the weights at open
            session = VisionEncoder(self.path, n_threads=self.n_threads, n_queries=self.n_queries,
                                    prepack=self.keep_vision)
            if session.hidden_size != self.hidden_size or session.image_size != self.spec.size:
                got = (session.hidden_size, session.image_size)
                session.close()
                raise BundleError(f"{self.path}: takes {got[1]} pixel images and gives rows {got[0]} wide, but the "
                                  f"manifest says {self.spec.size} and the decoder takes {self.hidden_size}: "
                                  "bundle parts from different checkpoints")
            self._session = session
        return self._session

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def _remember(self, key: str, rows: np.ndarray) -> None:
        self._memory[key] = rows
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def release(self) -> None:
        """Free the ONNX session (it is reopened when another image comes)."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
