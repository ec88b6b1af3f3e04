"""One decoder, many clients: a bounded line of requests in front of a single decoding thread.

llama.cpp holds one KV cache, so requests run one at a time, in arrival order, on one thread
(the engine also serializes, but one thread here means a stream is always opened and closed by
the same thread). At most ``1 + max_queue`` requests are admitted; the next one is told 503 with
a ``Retry-After`` from the recent generation times. A request whose client has gone (its
``cancel`` event set) is skipped if it has not started and stopped between two chunks if it
has, so a closed browser tab never keeps the decoder busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from qwenvl_edge.server.errors import APIError, busy

log = logging.getLogger("qwenvl_edge.server")

T = TypeVar("T")
_END = object()


class Cancelled(Exception):
    """The client went away before its request ran."""


class Ticket:
    """One admitted request: its place in the line, released exactly once."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.cancel = threading.Event()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._admitted -= 1


class Scheduler:
    def __init__(self, max_queue: int, timeout_s: float):
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._admitted = 0  # touched only on the event loop's thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        self._recent_s = 5.0  # moving average of a request's decoder time, for Retry-After
        self._closed = threading.Event()

    @property
    def admitted(self) -> int:
        return self._admitted

    def admit(self) -> Ticket:
        """A place in the line, or 503 when ``max_queue`` requests already wait behind the running one."""
        if self._admitted >= 1 + self.max_queue:
            raise busy(max(1, math.ceil(self._recent_s * self._admitted)))
        self._admitted += 1
        return Ticket(self)

    def _timed(self, fn: Callable[[], T], ticket: Ticket) -> T:
        if ticket.cancel.is_set() or self._closed.is_set():
            log.info("skipped: the client left while waiting")
            raise Cancelled()
        started = time.monotonic()
        try:
            return fn()
        finally:
            self._recent_s = 0.7 * self._recent_s + 0.3 * (time.monotonic() - started)

    async def run(self, fn: Callable[[], T], ticket: Ticket) -> T:
        """``fn()`` on the decoder thread, after the requests ahead of it; the ticket is released after."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._timed, fn, ticket)
        finally:
            ticket.release()

    async def stream(self, open_stream: Callable[[], Iterator[Any]], ticket: Ticket) -> AsyncIterator[Any]:
        """The items of ``open_stream()`` as the decoder thread makes them; stops the generation when
        ``ticket.cancel`` is set (client gone), the server closes, or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                ticket.cancel.set()

        def work() -> None:
            deadline = time.monotonic() + self.timeout_s
            chunks = open_stream()
            try:
                for n, chunk in enumerate(chunks, 1):
                    put(chunk)
                    if ticket.cancel.is_set() or self._closed.is_set():
                        log.info("client gone: generation stopped after %d chunks", n)
                        break
                    if time.monotonic() > deadline:
                        put(APIError(504, f"the generation ran past the server's limit of {self.timeout_s:g} s",
                                     type="timeout", code="timeout"))
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        def job() -> None:
            try:
                self._timed(work, ticket)
            except BaseException as e:  # handed to the request's task, which answers the client
                put(e)
            put(_END)
            with contextlib.suppress(RuntimeError):  # the place in line is free once the decoder is
                loop.call_soon_threadsafe(ticket.release)

        loop.run_in_executor(self._executor, job)
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            ticket.cancel.set()

    def close(self) -> None:
        """Stop the running generation at its next token and drop everything still waiting."""
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
