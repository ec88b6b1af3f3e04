"""One call at a time per model: llama.cpp's context and onnxruntime's session are not re-entrant.

``CallGuard`` serializes a model's calls. A blocking call holds the lock for its duration; a
stream holds it from its creation until it is exhausted, closed or garbage-collected, so another
thread's call waits for it. A new call from the thread that opened a stream, while that stream is
still open, would wait for itself forever: instead that stream is ended (its next ``next()``
raises ``StreamEndedError``) and the new call proceeds. After ``close()`` every call raises.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

from qwenvl_edge.errors import QwenVLError

T = TypeVar("T")


class StreamEndedError(QwenVLError):
    """A stream was ended because its thread made a new call on the same model."""


class ClosedError(QwenVLError):
    """The model was closed."""


class CancelledError(QwenVLError):
    """The caller's ``cancel`` check said stop: the call ended between two evaluation steps (an image,
    a prefill batch, a token), leaving the model ready for the next call."""


class GuardedStream(Generic[T]):
    """An iterator that holds its guard's lock while open; safe to read from any thread."""

    def __init__(self, guard: CallGuard, inner: Iterator[T]):
        self._guard = guard
        self._inner = inner
        self._step = threading.Lock()  # one next() at a time; abort() waits for a running one
        self._done = False
        self._error: str | None = None
        self.thread = threading.get_ident()

    def __iter__(self) -> GuardedStream[T]:
        return self

    def __next__(self) -> T:
        with self._step:
            if self._error is not None:
                raise StreamEndedError(self._error)
            if self._done:
                raise StopIteration
            try:
                return next(self._inner)
            except BaseException:
                self._finish()
                raise

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            try:
                close = getattr(self._inner, "close", None)
                if close is not None:
                    close()
            finally:
                self._guard._release(self)

    def close(self) -> None:
        """Stop early and let the next call in (what a generator's ``close`` does)."""
        with self._step:
            self._finish()

    def abort(self, reason: str) -> None:
        with self._step:
            if not self._done:
                self._error = reason
                self._finish()

    @property
    def open(self) -> bool:
        return not self._done

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class CallGuard:
    """The lock of one model, its open stream, and whether the model is closed."""

    def __init__(self, name: str = "model"):
        self.name = name
        self._lock = threading.Lock()
        self._stream: GuardedStream | None = None
        self.closed = False

    def _acquire(self) -> None:
        stream = self._stream
        if stream is not None and stream.thread == threading.get_ident() and stream.open:
            stream.abort(f"this {self.name} stream was ended: a new call was made on the same {self.name} "
                         "in the stream's thread before the stream was read to its end")
        self._lock.acquire()
        if self.closed:
            self._lock.release()
            raise ClosedError(f"this {self.name} is closed")

    def _release(self, stream: GuardedStream | None = None) -> None:
        if stream is not None:
            if self._stream is not stream:
                return
            self._stream = None
        self._lock.release()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Hold the lock for a blocking call."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def acquire_for_stream(self) -> None:
        """Take the lock for a stream about to be made with ``stream()``: work before it is serialized too."""
        self._acquire()

    def stream(self, inner: Iterator[T]) -> GuardedStream[T]:
        """Hand the lock (taken by ``acquire_for_stream``) to a stream over ``inner``."""
        guarded = GuardedStream(self, inner)
        self._stream = guarded
        return guarded

    def release_unstreamed(self) -> None:
        """Give back a lock taken by ``acquire_for_stream`` when the stream could not be made."""
        self._lock.release()

    def close(self, closer) -> None:
        """Run ``closer`` once no call is running; every later call raises ``ClosedError``."""
        stream = self._stream
        if stream is not None and stream.thread == threading.get_ident() and stream.open:
            stream.abort(f"this {self.name} was closed")
        with self._lock:
            if not self.closed:
                self.closed = True
                closer()
