"""One decoder, many clients: a bounded line of requests in front of ``parallel`` decoding threads.

With ``parallel`` 1 requests run one at a time, in arrival order, on one thread; with N, up to N run
at once, each on its own thread and its own sequence of the batched engine (``runtime/parallel.py``),
which decodes them together. A stream is always opened and closed by the same thread. At most
``parallel + max_queue`` requests are admitted; the next one is told 503 with a ``Retry-After``
from the recent generation times.

Every request ends at its deadline (``timeout_s`` after the decoder starts it), when its client
goes (its ``cancel`` event set) or when the server shuts down, streamed or not: the engine asks
``Ticket.stop`` between images, prefill batches and tokens and stops there, so the decoder is free
for the next request at once; the client is answered at that moment (504 / an SSE error event,
503 on shutdown) even if the engine is inside one long step. A request whose client has gone
before it started is skipped, never run.
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

from qwenvl_edge.runtime.serial import CancelledError
from qwenvl_edge.server.errors import APIError, busy

log = logging.getLogger("qwenvl_edge.server")

T = TypeVar("T")
_END = object()
POLL_S = 0.1  # how often a waiting request looks at its deadline and the shutdown flag


class Cancelled(Exception):
    """The client went away: nobody reads the answer."""


Stop = Callable[[], bool]


class Ticket:
    """One admitted request: its place in the line (released exactly once), its client's ``cancel`` event
    and its deadline (set when the decoder starts it)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.cancel = threading.Event()
        self.deadline: float | None = None
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._admitted -= 1

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def stop(self) -> bool:
        """Whether the engine should stop now (the check it makes between tokens)."""
        return self.cancel.is_set() or self._scheduler.closing or self.expired()

    def outcome(self) -> BaseException:
        """Why the request stopped, as the client is told: shutdown 503, deadline 504, else client gone."""
        if self._scheduler.closing:
            return shutting_down()
        if self.expired():
            return timed_out(self._scheduler.timeout_s)
        return Cancelled()


def timed_out(limit_s: float) -> APIError:
    return APIError(504, f"the generation ran past the server's limit of {limit_s:g} s (--request-timeout)",
                    type="timeout", code="timeout")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: the request was stopped", type="unavailable_error",
                    code="shutting_down")


class Scheduler:
    def __init__(self, max_queue: int, timeout_s: float, parallel: int = 1):
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.parallel = parallel
        self._admitted = 0  # touched only on the event loop's thread
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="decoder")
        self._recent_s = 5.0  # moving average of a request's decoder time, for Retry-After
        self.closing = False  # a plain flag: set from a signal handler, read by the decoder threads
        self._running = 0  # requests the decoder threads are inside now (0 .. parallel), for /metrics
        self._count = threading.Lock()

    @property
    def running(self) -> int:
        return self._running

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def waiting(self) -> int:
        """Admitted requests no decoder thread has started (the queue's depth)."""
        return max(0, self._admitted - self.running)

    def admit(self) -> Ticket:
        """A place in the line, or 503 when ``max_queue`` requests already wait behind the running ones."""
        if self.closing:
            raise shutting_down()
        if self._admitted >= self.parallel + self.max_queue:
            raise busy(max(1, math.ceil(self._recent_s * self._admitted / self.parallel)))
        self._admitted += 1
        return Ticket(self)

    def _timed(self, fn: Callable[[Stop], T], ticket: Ticket, log_stop: bool = True) -> T:
        """``fn(ticket.stop)`` on the decoder thread; its deadline starts now. The engine's
        ``CancelledError`` becomes why it was stopped (a stream logs that itself, with its chunk count)."""
        if ticket.stop():
            if not self.closing:
                log.info("skipped: the client left while waiting")
            raise ticket.outcome()
        started = time.monotonic()
        ticket.deadline = started + self.timeout_s
        with self._count:
            self._running += 1
        try:
            return fn(ticket.stop)
        except CancelledError:
            reason = ticket.outcome()
            if log_stop:
                log.info("generation stopped: %s", "the client left" if isinstance(reason, Cancelled) else reason)
            raise reason from None
        finally:
            with self._count:
                self._running -= 1
            self._recent_s = 0.7 * self._recent_s + 0.3 * (time.monotonic() - started)

    async def run(self, fn: Callable[[Stop], T], ticket: Ticket) -> T:
        """``fn(stop)`` on the decoder thread, after the requests ahead of it. Raises at the deadline, the
        client's leaving or shutdown at once (the engine stops at its next check); the ticket is released
        when the decoder is done with it."""
        if self.closing:
            ticket.release()
            raise shutting_down()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._timed, fn, ticket)
        future.add_done_callback(lambda f: _settled(f, ticket))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=POLL_S)
                if done:
                    return future.result()
                if ticket.stop() and (ticket.deadline is not None or self.closing):  # the engine follows
                    raise ticket.outcome()
        finally:
            ticket.cancel.set()  # whatever ended the wait, the engine has nobody to answer any more

    async def stream(self, open_stream: Callable[[Stop], Iterator[Any]], ticket: Ticket) -> AsyncIterator[Any]:
        """The items of ``open_stream(stop)`` as the decoder thread makes them; ends with the reason
        (504, 503) when the deadline passes or the server closes, and stops the engine when the
        consumer goes away (client gone)."""
        if self.closing:
            ticket.release()
            raise shutting_down()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                ticket.cancel.set()

        def work(stop: Stop) -> None:
            chunks = open_stream(stop)
            n = 0
            try:
                for n, chunk in enumerate(chunks, 1):  # noqa: B007 -- n is logged below
                    put(chunk)
                    if stop():
                        raise CancelledError("stopped between chunks")
            except CancelledError:
                _log_stop(ticket, n)
                raise
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        def job() -> None:
            try:
                self._timed(work, ticket, False)
            except BaseException as e:  # handed to the request's task, which answers the client
                put(e)
            put(_END)
            with contextlib.suppress(RuntimeError):  # the place in line is free once the decoder is
                loop.call_soon_threadsafe(ticket.release)

        loop.run_in_executor(self._executor, job)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(items.get(), POLL_S)
                except asyncio.TimeoutError:
                    if ticket.stop() and (ticket.deadline is not None or self.closing):
                        raise ticket.outcome() from None
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            ticket.cancel.set()

    def begin_shutdown(self) -> None:
        """Stop every request now: the running one at its next check, the waiting ones before they start.
        Safe in a signal handler (it only sets a flag)."""
        self.closing = True

    def close(self) -> None:
        """``begin_shutdown``, and no more work for the decoder thread."""
        self.begin_shutdown()
        self._executor.shutdown(wait=False)


def _settled(future: asyncio.Future, ticket: Ticket) -> None:
    """The decoder is done with the ticket: free its place; an outcome nobody awaited is not logged."""
    ticket.release()
    if not future.cancelled():
        future.exception()


def _log_stop(ticket: Ticket, n: int) -> None:
    reason = ticket.outcome()
    if isinstance(reason, Cancelled):
        log.info("client gone: generation stopped after %d chunks", n)
    else:
        log.info("generation stopped after %d chunks: %s", n, reason)
