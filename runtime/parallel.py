"""``ParallelQwenVL``: the server's engine for ``--parallel N``, N conversations decoded together.

N ``QwenVL`` slots share one vision session and one batched llama.cpp context (``batching.py``), one
sequence each. A request takes the free slot whose KV cache already holds its prompt's start (the
earlier turns of its own conversation), else the least recently used one; it runs on the caller's
thread as a lone ``QwenVL`` call would, and frees the slot when its answer ends or its stream is closed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenvl_edge import validate
from qwenvl_edge.errors import BundleError, QwenVLError
from qwenvl_edge.runtime import chat_api
from qwenvl_edge.runtime.batching import DEFAULT_CHUNK, Batcher, SeqDecoder
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.pipeline import DEFAULT_CACHE, QwenVL
from qwenvl_edge.runtime.prompt import n_positions

MOST = 4  # the default's ceiling: past four, a CPU's decode steps stop being nearly free


class ParallelQwenVL:
    """``n_seq`` ``QwenVL`` slots over one batched context; ``create_chat_completion`` from any thread."""

    def __init__(self, bundle_dir: Path | str | None, n_seq: int, n_threads: int | None = None,
                 n_ctx: int = validate.DEFAULT_N_CTX, *, cache_dir=DEFAULT_CACHE, verbose: bool = False,
                 use_mmap: bool = False, repack: bool = True, chunk: int = DEFAULT_CHUNK):
        bundle = Bundle.open(Path(bundle_dir).expanduser() if bundle_dir is not None else None)
        info = bundle.model
        n_ctx = validate.n_ctx(n_ctx, info.seq_length)
        self.batcher = Batcher(bundle.llm_path, n_seq, n_ctx, validate.n_threads(n_threads), chunk, verbose,
                               use_mmap, repack)
        try:
            if self.batcher.n_embd != info.hidden_size or self.batcher.n_vocab != info.vocab_size:
                raise BundleError(f"{bundle.llm_path}: width {self.batcher.n_embd} / vocab {self.batcher.n_vocab}, "
                                  f"manifest says {info.hidden_size} / {info.vocab_size}: parts from different exports")
            first = QwenVL(bundle.folder, n_threads, n_ctx, cache_dir=cache_dir, verbose=verbose,
                           engines=(None, SeqDecoder(self.batcher, 0)))
            self.slots = [first] + [
                QwenVL(bundle.folder, n_threads, n_ctx, cache_dir=cache_dir, verbose=verbose,
                       engines=(first.session.encoder, SeqDecoder(self.batcher, seq))) for seq in range(1, n_seq)]
        except BaseException:
            self.batcher.close()
            raise
        self.bundle = first.bundle
        self.info = info
        self.n_ctx = n_ctx
        self._free = list(self.slots)
        self._lock = threading.Condition()

    @property
    def n_seq(self) -> int:
        return len(self.slots)

    def _take(self, messages: Any) -> QwenVL:
        """The free slot that suits this request's prompt best (``_fit``); a call waits for one when all are
        busy, as a second call on one ``QwenVL`` waits for the first."""
        with self._lock:
            while not self._free:
                self._lock.wait()
            best = self._free[0]  # the least recently used
            if len(self._free) > 1:
                units = _units(best, messages)
                if units:
                    best = max(self._free, key=lambda slot: _fit(slot.session.decoder(), units))
            self._free.remove(best)
            return best

    def _give_back(self, slot: QwenVL) -> None:
        self.batcher.leave(slot.session.decoder().seq)
        with self._lock:
            self._free.append(slot)
            self._lock.notify()

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **kwargs) -> dict | Iterator[dict]:
        """``QwenVL.create_chat_completion`` on a free sequence; the stream gives it back when it ends."""
        slot = self._take(messages)
        try:
            out = slot.create_chat_completion(messages, stream=stream, **kwargs)
        except BaseException:
            self._give_back(slot)
            raise
        if not stream:
            self._give_back(slot)
            return out
        return self._streamed(out, slot)

    def _streamed(self, chunks, slot: QwenVL) -> Iterator[dict]:
        try:
            yield from chunks
        finally:
            chunks.close()
            self._give_back(slot)

    def close(self) -> None:
        """Free every slot, then the shared context and model."""
        for slot in self.slots:
            slot.close()
        self.batcher.close()

    def __enter__(self) -> ParallelQwenVL:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fit(decoder, units: list) -> int:
    """How well a sequence suits a prompt: the positions it can keep, less those it would lose. A new
    conversation that shares only the system prompt does not evict another conversation's turns; ties go
    to the least recently used sequence."""
    kept = n_positions(units[:decoder.common_prefix(units)])
    return kept - (decoder.n_past - kept)


def _units(slot: QwenVL, messages: Any) -> list:
    """The request's prompt units (nothing when it is malformed: the call itself reports that)."""
    try:
        conv = chat_api.parse_messages(messages)
        return slot.session.build(conv.images, conv.question, conv.history, conv.system)
    except QwenVLError:
        return []
