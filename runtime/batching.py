"""Continuous batching: N sequences of one llama.cpp context, decoded together by one thread.

Each request runs on its own thread through a ``SeqDecoder``: the ``Decoder`` interface for one
sequence of a shared context. Every evaluation it asks for (a prefill chunk, a chunk of an image's
rows, the token it just sampled) becomes a ``Step`` handed to the ``Batcher``'s thread, which puts
the token steps of all sequences into one ``llama_decode``. Decoding on a CPU is bound by reading
the weights, so a step that carries four sequences' tokens costs little more than one. Image rows
(embeddings cannot share a batch with token ids) go one chunk at a time, taking turns with the
token steps, so running answers keep streaming while a new prompt is prefilled.

Right after a step, each sequence's logits are copied out. A request samples from its own copy,
and the next token step waits for every sequence of the last one to hand in its next token (at
most ``GATHER_S``; a sequence whose answer ended leaves at once): without that wait the answers
take turns, one sequence per step, and batching gains nothing. Everything else that touches the
context (KV removal, state get and set) also runs on the batcher's thread, between steps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.runtime.decoder import Decoder, Tokenizer, load_model, make_context, sample_logits

T = TypeVar("T")
DEFAULT_CHUNK = 64  # prefill positions per step while others decode: a step at full size is a few seconds
GATHER_S = 0.05  # how long a token step waits for the sequences of the last one (they sample in a few ms)


class ClosedBatcher(QwenVLError):
    """The batched decoder was closed."""


@dataclass
class Step:
    """One sequence's request to the batcher thread: token ids, image rows, or a call on the context."""

    seq: int
    ids: Sequence[int] = ()
    rows: np.ndarray | None = None
    start: int = 0
    logits: np.ndarray | None = None  # where the last position's logits go (None: not wanted)
    call: Callable[[], Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return len(self.ids) if self.rows is None else len(self.rows)


class Batcher:
    """One model and one context of ``n_seq`` sequences of ``n_ctx`` positions; a thread runs their steps."""

    def __init__(self, gguf_path: Path, n_seq: int, n_ctx: int, n_threads: int | None = None,
                 chunk: int = DEFAULT_CHUNK, verbose: bool = False, use_mmap: bool = False, repack: bool = True):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch

        self.lib = llama_cpp
        self.path = Path(gguf_path)
        self.n_seq = n_seq
        self.chunk = max(1, min(chunk, n_ctx))
        self.capacity = self.chunk + n_seq  # a prefill chunk and every other sequence's next token
        self._stack = contextlib.ExitStack()
        try:
            self.model = self._stack.enter_context(contextlib.closing(
                load_model(self.path, use_mmap=use_mmap, repack=repack, verbose=verbose)))
            self.ctx = self._stack.enter_context(contextlib.closing(
                make_context(self.model, self.path, n_ctx, self.capacity, n_threads, verbose, n_seq)))
            self.n_embd = llama_cpp.llama_model_n_embd_inp(self.model.model)
            self._tokens = self._stack.enter_context(contextlib.closing(
                LlamaBatch(n_tokens=self.capacity, embd=0, n_seq_max=1)))
            self._rows = self._stack.enter_context(contextlib.closing(
                LlamaBatch(n_tokens=self.chunk, embd=self.n_embd, n_seq_max=1)))
        except BaseException:
            self._stack.close()
            raise
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx.ctx)
        self.n_vocab = self.model.n_vocab()
        self.tokenizer = Tokenizer(self.model)
        self._embd = np.ctypeslib.as_array(self._rows.batch.embd, shape=(self.chunk * self.n_embd,))
        self._pending: deque[Step] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rows_last = False  # token steps and row chunks take turns
        self._expect: set[int] = set()  # the sequences of the last token step: the next one waits for them
        self.steps = 0  # llama_decode calls made
        self.shared_steps = 0  # of them, those that carried more than one sequence
        self.tokens_stepped = 0
        self._thread = threading.Thread(target=self._loop, name="qwenvl-batcher", daemon=True)
        self._thread.start()

    # --- the requests' side ------------------------------------------------------------------

    def run(self, step: Step) -> Any:
        """Hand ``step`` to the batcher thread and wait for it (on that thread: run it now)."""
        if threading.current_thread() is self._thread:
            return step.call() if step.call is not None else self._execute([step])
        with self._cond:
            if self._closed:
                raise ClosedBatcher("the batched decoder is closed")
            self._pending.append(step)
            self._cond.notify()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.result

    def call(self, seq: int, fn: Callable[[], T]) -> T:
        """``fn()`` on the batcher thread, between two steps."""
        return self.run(Step(seq, call=fn))

    def leave(self, seq: int) -> None:
        """``seq``'s request is over: the next step does not wait for it."""
        with self._cond:
            self._expect.discard(seq)
            self._cond.notify()

    # --- the batcher thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                steps = self._next()
            if steps is None:
                return
            try:
                if steps[0].call is not None:
                    steps[0].result = steps[0].call()
                else:
                    self._execute(steps)
            except BaseException as e:  # noqa: BLE001 - handed to the requests, which raise it
                for step in steps:
                    step.error = e
            for step in steps:
                step.done.set()

    def _next(self) -> list[Step] | None:
        """The next step's work, once every sequence of the last token step has handed in its next one (or
        ``GATHER_S`` passed); None when closed and nothing is left. Called with the lock held."""
        deadline = None
        while True:
            if not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
                continue
            waiting = self._expect - {step.seq for step in self._pending}
            if not waiting or self._closed or any(step.call is not None for step in self._pending):
                return self._take()
            now = time.monotonic()
            deadline = deadline or now + GATHER_S
            if now >= deadline:
                return self._take()
            self._cond.wait(deadline - now)

    def _take(self) -> list[Step]:
        """The next step's work: a call alone; else the token steps that fit one batch, or one row chunk,
        taking turns when both wait."""
        pending = self._pending
        for i, step in enumerate(pending):
            if step.call is not None:
                del pending[i]
                return [step]
        rows = [s for s in pending if s.rows is not None]
        tokens = [s for s in pending if s.rows is None]
        if rows and (not tokens or not self._rows_last):
            self._rows_last = True
            pending.remove(rows[0])
            return [rows[0]]
        self._rows_last = False
        tokens.sort(key=lambda s: s.size)  # single tokens of running answers first, then prefill chunks
        taken, n = [], 0
        for step in tokens:
            if n + step.size <= self.capacity:
                taken.append(step)
                n += step.size
        for step in taken:
            pending.remove(step)
        # in sequence order: llama.cpp splits a batch of several KV streams wherever the sequence ids stop
        # rising, and each piece is one more pass over the weights (arrival order made 4 tokens cost 3 passes)
        return sorted(taken, key=lambda s: s.seq)

    def _execute(self, steps: list[Step]) -> None:
        """One ``llama_decode`` of ``steps`` (all token steps, or one row chunk); logits copied out."""
        batch = self._rows if steps[0].rows is not None else self._tokens
        raw = batch.batch
        outputs: list[tuple[Step, int]] = []
        j = 0
        for step in steps:
            if step.rows is not None:
                self._embd[:step.rows.size] = step.rows.reshape(-1)
            for i in range(step.size):
                if step.rows is None:
                    raw.token[j] = step.ids[i]
                raw.pos[j] = step.start + i
                raw.n_seq_id[j] = 1
                raw.seq_id[j][0] = step.seq
                raw.logits[j] = False
                j += 1
            if step.logits is not None:
                raw.logits[j - 1] = True
                outputs.append((step, j - 1))
        raw.n_tokens = j
        rc = self.lib.llama_decode(self.ctx.ctx, raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.steps += 1
        self.shared_steps += len(steps) > 1
        self.tokens_stepped += j
        if steps[0].rows is None:
            with self._cond:
                self._expect = {step.seq for step in steps}
        for step, index in outputs:
            step.logits[:] = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx.ctx, index),
                                                   shape=(self.n_vocab,))

    def close(self) -> None:
        """Finish the steps already handed in, stop the thread, free the context and the model."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._stack.close()


class SeqDecoder(Decoder):
    """The ``Decoder`` of one sequence of a ``Batcher``'s context: same prefix mirror and prefill logic,
    its evaluations done as batcher steps, its logits a private copy."""

    def __init__(self, batcher: Batcher, seq: int):
        # not super().__init__: that loads a model and a context of its own
        self._llama_cpp = batcher.lib
        self._stack = contextlib.ExitStack()
        self.batcher = batcher
        self.seq = seq
        self.path = batcher.path
        self.model = batcher.model
        self.ctx = batcher.ctx
        self.n_ctx = batcher.n_ctx
        self.n_batch = batcher.chunk
        self.n_vocab = batcher.n_vocab
        self.n_embd = batcher.n_embd
        self.tokenizer = batcher.tokenizer
        self.units = []
        self.n_evaluated = 0
        self._eog = None
        self._logits = np.zeros(self.n_vocab, dtype=np.float32)

    def _decode_ids(self, ids: Sequence[int], start: int, logits: bool) -> None:
        self.batcher.run(Step(self.seq, ids=list(ids), start=start, logits=self._logits if logits else None))
        self.n_evaluated += len(ids)

    def _decode_rows(self, rows: np.ndarray, start: int, logits: bool) -> None:
        self.batcher.run(Step(self.seq, rows=rows, start=start, logits=self._logits if logits else None))
        self.n_evaluated += len(rows)

    def _seq_rm(self, start: int) -> None:
        self.batcher.call(self.seq, lambda: Decoder._seq_rm(self, start))

    def last_logits(self) -> np.ndarray:
        return self._logits.copy()

    def sample(self, sampler) -> int:
        return sample_logits(sampler, self._logits)

    def save_state(self) -> np.ndarray:
        return self.batcher.call(self.seq, lambda: Decoder.save_state(self))

    def load_state(self, state: np.ndarray, units) -> bool:
        return self.batcher.call(self.seq, lambda: Decoder.load_state(self, state, units))

    def close(self) -> None:
        """Nothing of its own to free: the batcher owns the context."""
