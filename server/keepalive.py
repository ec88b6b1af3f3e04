"""The served model, resident as ollama keeps one: unloaded after ``--keep-alive`` idle seconds, loaded again
by the next request (which waits for it on the decoder thread).

``ResidentModel`` stands where the app expects the engine (``ServerState.model``): it has the engine's
``create_chat_completion``, ``last_result`` and ``close``, and loads the engine when a call needs it. The
app never sees ``None`` after the first load, so ``/health`` stays 200 while the model is unloaded but can
load again; ``GET /api/ps`` says whether it is loaded and how long it has been idle. A call and an unload
never overlap: both take one lock, and the engine is unloaded only while no call or stream holds it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from qwenvl_edge.errors import OptionError

log = logging.getLogger("qwenvl_edge.server")
DEFAULT_KEEP_ALIVE = "5m"  # ollama's default: the model stays loaded 5 minutes after the last request
DURATION = re.compile(r"\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*(ms|s|m|h)?\s*", re.I)
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
NEVER = ("never", "inf", "forever")


def parse_keep_alive(value: Any) -> float | None:
    """``--keep-alive`` in seconds, as ollama spells it: ``300``, ``30s``, ``5m``, ``1h``; 0 unloads the model as
    soon as a request ends; a negative value (or ``never``) keeps it loaded: None. Idempotent (None, a float)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in NEVER:
            return None
        m = DURATION.fullmatch(text)
        if m is None:
            raise OptionError(f"--keep-alive must be seconds or a duration such as 30s, 5m, 1h (negative or "
                              f"'never': keep the model loaded), got {value!r}")
        seconds = float(m.group(1)) * UNITS[(m.group(2) or "s").lower()]
    if math.isnan(seconds):
        raise OptionError(f"--keep-alive must be a number of seconds, got {value!r}")
    return None if seconds < 0 or math.isinf(seconds) else seconds


class ResidentModel:
    """The engine, loaded on demand and unloaded after ``keep_alive_s`` idle seconds (None: never)."""

    def __init__(self, load: Callable[[], Any], keep_alive_s: float | None,
                 clock: Callable[[], float] = time.monotonic):
        self._load = load
        self.keep_alive_s = keep_alive_s
        self._clock = clock
        self._lock = threading.Lock()
        self._engine: Any = load()  # the first load runs at start-up: its failure stops the server
        self._busy = 0
        self._last_used = clock()
        self._closed = False
        self.loads, self.unloads = 1, 0
        self.last_result: Any = None
        self._stop = threading.Event()
        if keep_alive_s:  # 0 unloads as each call ends (in _release), None never
            threading.Thread(target=self._watch, name="keep-alive", daemon=True).start()

    # --- what the app calls -------------------------------------------------------------------------

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **kwargs: Any) -> Any:
        engine = self._acquire()
        if not stream:
            try:
                return engine.create_chat_completion(messages, **kwargs)
            finally:
                self._release(engine)
        try:
            chunks = engine.create_chat_completion(messages, stream=True, **kwargs)
        except BaseException:
            self._release(engine)
            raise
        return _HeldStream(chunks, lambda: self._release(engine))

    @contextlib.contextmanager
    def held(self) -> Iterator[Any]:
        """The loaded engine, kept from unloading until the block ends: for a caller that uses the engine
        other than through ``create_chat_completion`` (a batching scheduler that drives it step by step)."""
        engine = self._acquire()
        try:
            yield engine
        finally:
            self._release(engine)

    def __getattr__(self, name: str) -> Any:
        """Anything else the engine offers, from the loaded engine (loading it if it was unloaded)."""
        if name.startswith("_"):
            raise AttributeError(name)
        engine = self._acquire()
        try:
            return getattr(engine, name)
        finally:
            self._release(engine)

    def close(self) -> None:
        """Free the engine for good (server shutdown); later calls raise the engine's ``ClosedError``."""
        self._stop.set()
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    # --- keep-alive ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def status(self) -> dict:
        """What ``/api/ps`` and ``qwenvl-edge ps`` show: loaded or not, idle seconds, seconds until it unloads."""
        with self._lock:
            idle = None if self._busy else max(0.0, self._clock() - self._last_used)
            loaded, busy = self._engine is not None, self._busy
        expires = None
        if loaded and idle is not None and self.keep_alive_s is not None:
            expires = max(0.0, self.keep_alive_s - idle)
        return {"loaded": loaded, "busy": busy, "idle_s": idle, "keep_alive_s": self.keep_alive_s,
                "unloads_in_s": expires, "loads": self.loads, "unloads": self.unloads}

    def unload_if_idle(self) -> bool:
        """Unload the engine if nothing has used it for ``keep_alive_s`` seconds; True if it did."""
        with self._lock:
            if (self._engine is None or self._busy or self._closed or self.keep_alive_s is None
                    or self._clock() - self._last_used < self.keep_alive_s):
                return False
            engine, self._engine = self._engine, None
            self.unloads += 1
            engine.close()  # under the lock: a request that comes now waits, then loads a fresh engine
        log.info("model unloaded after %.0f s idle (--keep-alive); the next request loads it again",
                 self.keep_alive_s)
        return True

    def _watch(self) -> None:
        interval = min(1.0, max(0.05, (self.keep_alive_s or 1.0) / 4))
        while not self._stop.wait(interval):
            try:
                self.unload_if_idle()
            except Exception:  # an engine that fails to close must not end the watcher
                log.exception("unloading the idle model failed")

    def _acquire(self) -> Any:
        """The engine, loaded if it was unloaded, marked busy until ``_release``."""
        with self._lock:
            if self._closed:
                from qwenvl_edge.runtime.serial import ClosedError

                raise ClosedError("the server is shutting down")
            if self._engine is None:
                started = time.monotonic()
                log.info("loading the model again (it was unloaded after %s s idle)", _seconds(self.keep_alive_s))
                self._engine = self._load()
                self.loads += 1
                log.info("model loaded in %.1f s", time.monotonic() - started)
            self._busy += 1
            return self._engine

    def _release(self, engine: Any) -> None:
        with self._lock:
            self._busy -= 1
            self._last_used = self._clock()
            self.last_result = getattr(engine, "last_result", None)
        if self.keep_alive_s == 0:
            self.unload_if_idle()


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:g}"


class _HeldStream:
    """An engine stream that keeps the engine busy until it ends or is closed (released exactly once, even
    when it is closed before its first chunk, where a generator's ``finally`` would never run)."""

    def __init__(self, chunks: Iterator[Any], release: Callable[[], None]):
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> _HeldStream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._chunks)
        except BaseException:  # the end, or an error: either way the engine is free
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            release()

    def __del__(self) -> None:
        self.close()


def add_status_route(app: Any, model_id: str) -> None:
    """``GET /api/ps`` (no API key, as ``/health``; no paths or request content): this server's pid and its
    model's state: ``loading`` (first load), ``loaded`` or ``unloaded`` (loads again on the next request)."""
    from fastapi.responses import JSONResponse

    started = time.time()

    @app.get("/api/ps", include_in_schema=False)
    async def ps() -> JSONResponse:
        model = app.state.server.model
        if isinstance(model, ResidentModel):
            status = model.status()
            state = "loaded" if status["loaded"] else "unloaded"
        else:
            status, state = {"loaded": model is not None}, "loading" if model is None else "loaded"
        return JSONResponse({"pid": os.getpid(), "model": model_id, "state": state, "started": started, **status})
