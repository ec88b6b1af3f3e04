"""One model copy answering batches of rows: this process (``batch`` without ``--ray``) or one Ray actor.

It checks the bundle it was given before it answers: the manifest's sha256 of every file, as
``qwenvl-edge verify`` does (``Bundle.verify_checksums``), because on a cluster each machine reads its own
copy of the shared path, and a machine whose copy differs would answer from another model without a word.
A copy that fails the check (or cannot open the bundle at all) answers nothing: each batch it is given comes
back with ``fatal`` set, and the driver stops the job with that one line.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from qwenvl_edge.errors import QwenVLError

ROW_FIELDS = ("text", "boxes", "finish_reason", "timings")


@dataclass(frozen=True)
class ModelSpec:
    """What each copy needs to open the model and sample alike (plain values: it is sent to Ray actors)."""

    bundle: str  # absolute: each worker opens the same shared path
    n_threads: int | None
    n_ctx: int
    use_cache: bool
    load: str
    max_tokens: int | None
    temperature: float
    top_p: float | None
    seed: int | None


def where_am_i() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


class Answerer:
    """Opens the bundle once (after checking it) and answers rows ``{"id", "images", "question"}``."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.fatal: str | None = None
        self.model = None
        try:
            self.model = open_checked(spec)
        except (QwenVLError, OSError) as e:
            self.fatal = f"worker {where_am_i()}: {e}"

    def answer(self, rows: list[dict]) -> list[dict]:
        """One output row per row, in order; a row that fails becomes ``{"id", "error"}`` and costs only itself."""
        if self.fatal:
            raise QwenVLError(self.fatal)
        return [self._one(row) for row in rows]

    def _one(self, row: dict) -> dict:
        s = self.spec
        try:
            result = self.model.generate(list(row["images"]), row["question"], max_tokens=s.max_tokens,
                                         temperature=s.temperature, top_p=s.top_p).to_dict()
        except QwenVLError as e:
            return {"id": row["id"], "error": str(e)}
        except Exception as e:  # noqa: BLE001 (one odd image must not stop 100,000 rows; the row says what it was)
            return {"id": row["id"], "error": f"{type(e).__name__}: {e}".replace("\n", " ")}
        return {"id": row["id"], **{k: result[k] for k in ROW_FIELDS}}

    def close(self) -> None:
        if self.model is not None:
            self.model.close()


def open_checked(spec: ModelSpec) -> Any:
    """The bundle's files checked against its manifest, then opened as a ``QwenVL``."""
    from qwenvl_edge.runtime.bundle import Bundle
    from qwenvl_edge.runtime.pipeline import QwenVL
    from qwenvl_edge.runtime.store import default_store_dir

    Bundle.open(spec.bundle).verify_checksums()
    return QwenVL(spec.bundle, n_threads=spec.n_threads, n_ctx=spec.n_ctx, keep_vision=True,
                  cache_dir=default_store_dir() if spec.use_cache else None, seed=spec.seed,
                  use_mmap=spec.load == "map", repack=spec.load == "read")
