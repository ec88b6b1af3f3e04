"""The FastAPI app: OpenAI's chat API over one ``QwenVL``, and the photo page at ``/``.

A request goes: body size (``BodyLimit``) -> shape (``ChatRequest``) -> API key -> model name
-> images (``ImageResolver``: sources, types, pixels, count) -> a place in line (``Scheduler``)
-> the engine's ``create_chat_completion``. Everything a client got wrong is refused on the way
with OpenAI's error shape; only a request that passed all of it reaches the model.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.server.errors import APIError, bad_request, sse_error
from qwenvl_edge.server.handlers import engine_error, install_error_handlers
from qwenvl_edge.server.images import ImageResolver
from qwenvl_edge.server.limits import BodyLimit
from qwenvl_edge.server.metrics import CountRequests, Metrics
from qwenvl_edge.server.options import ServeConfig
from qwenvl_edge.server.scheduler import Cancelled, Scheduler, Ticket
from qwenvl_edge.server.schema import ChatRequest, engine_messages

log = logging.getLogger("qwenvl_edge.server")
STATIC = files("qwenvl_edge.server") / "static"


class ServerState:
    """The model (``None`` while it loads), the line in front of it, and the image checks."""

    def __init__(self, config: ServeConfig, load_model: Callable[[], Any],
                 on_load_error: Callable[[BaseException], None]):
        self.config = config
        self.model: Any = None
        self.created = int(time.time())
        self.scheduler = Scheduler(config.limits.max_queue, config.limits.request_timeout_s, config.parallel)
        self.images = ImageResolver(config)
        self.metrics = Metrics()
        self._load_model = load_model
        self._on_load_error = on_load_error

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self.model = self._load_model()
        except BaseException as e:  # reported by the CLI, which stops the server
            self._on_load_error(e)
            return
        log.info("model loaded in %.1f s", time.monotonic() - started)

    def ready_model(self) -> Any:
        if self.model is None:
            raise APIError(503, "the model is still loading", type="unavailable_error", code="model_loading",
                           headers={"Retry-After": "5"})
        return self.model


def create_app(config: ServeConfig, load_model: Callable[[], Any],
               on_load_error: Callable[[BaseException], None] = lambda e: None) -> FastAPI:
    """The app; ``load_model`` runs on a thread at start-up (``/health`` answers 503 until it returns)."""
    state = ServerState(config, load_model, on_load_error)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.start_loading()
        yield
        state.scheduler.close()
        await state.images.aclose()
        if state.model is not None and hasattr(state.model, "close"):
            await asyncio.get_running_loop().run_in_executor(None, state.model.close)

    app = FastAPI(title="qwenvl-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    if config.cors_origins:  # outside the body limit, so a browser can read a 413 too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(CountRequests, metrics=state.metrics)  # outermost: every answer is counted
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        state.ready_model()
        return JSONResponse({"status": "ok", "model": config.model_id, "waiting": state.scheduler.admitted})

    @app.get("/metrics")  # no API key, as /health: counts and sizes only, never a request's content
    async def metrics() -> Response:
        text = state.metrics.render(state.scheduler.waiting, state.scheduler.running, state.scheduler.parallel)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> JSONResponse:
        _check_model_name(model_id, config, param=None)
        return JSONResponse(_model_card(state))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # browsers and bookmarks ask for it whatever the page links
        return Response((STATIC / "favicon.ico").read_bytes(), media_type="image/x-icon",
                        headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(packages=[("qwenvl_edge.server", "static")]), name="static")
    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.config.model_id, "object": "model", "created": state.created, "owned_by": "qwenvl-edge"}


def _check_model_name(name: str | None, config: ServeConfig, param: str | None = "model") -> None:
    if name and name != config.model_id:
        raise APIError(404, f"the model '{name}' does not exist: this server serves '{config.model_id}'",
                       param=param, code="model_not_found")


async def _chat(state: ServerState, body: ChatRequest, request: Request) -> Response:
    """Check everything about the request, then hand it to the decoder thread."""
    config = state.config
    _check_model_name(body.model, config)
    n = _choices(body, state.scheduler.parallel)
    parts = body.image_parts()
    if len(parts) > config.limits.max_images:
        raise bad_request(f"{len(parts)} images in one request; this server accepts at most "
                          f"{config.limits.max_images}", "messages", "too_many_images")
    model = state.ready_model()
    urls = {id(part): await state.images.resolve(part.url, param) for param, part in parts}
    messages = engine_messages(body, urls)
    args = body.engine_args()

    def observe(result) -> None:  # the finished generation's timings, from whichever sequence ran it
        state.metrics.observe(result.timings)

    if n > 1:
        return await _several(state, model, messages, {**args, "on_result": observe}, n, request)
    ticket = state.scheduler.admit()
    watcher = asyncio.create_task(_watch_disconnect(request, ticket))

    def answer(stop: Callable[[], bool]) -> dict:
        return model.create_chat_completion(messages, cancel=stop, on_result=observe, **args)

    def streamed(stop: Callable[[], bool]) -> Iterator[dict]:
        return model.create_chat_completion(messages, stream=True, cancel=stop, on_result=observe, **args)

    try:
        if not body.stream:
            result = await state.scheduler.run(answer, ticket)
            watcher.cancel()
            return JSONResponse(_named(result, config.model_id))
        chunks = state.scheduler.stream(streamed, ticket)
        head = await _head(chunks)  # errors before the first token still get their own status
    except BaseException as e:
        watcher.cancel()
        return _failed(e)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(head, chunks, include_usage, config.model_id, ticket, watcher),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _choices(body: ChatRequest, parallel: int) -> int:
    """``n``, checked: more than one answer runs as that many sequences at once, answered together."""
    n = 1 if body.n is None else body.n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}", "n")
    if n > parallel:
        raise bad_request(f"n={n} but this server decodes at most {parallel} sequences together (serve --parallel)",
                          "n")
    if n > 1 and body.stream:
        raise bad_request("n > 1 is answered whole: set stream to false", "n")
    return n


async def _several(state: ServerState, model: Any, messages: list[dict], args: dict, n: int,
                   request: Request) -> Response:
    """``n`` answers to one request, each on its own sequence, decoded together; a seed gives the i-th
    answer seed + i (so they differ, and the set is repeatable). ``args``: the engine's, ``on_result`` included."""
    tickets: list[Ticket] = []
    try:
        for _ in range(n):
            tickets.append(state.scheduler.admit())
    except APIError:
        for ticket in tickets:
            ticket.release()
        raise
    watcher = asyncio.create_task(_watch_disconnect(request, *tickets))

    def answer(i: int) -> Callable[[Callable[[], bool]], dict]:
        seed = args["seed"] if args["seed"] is None else (args["seed"] + i) % 2**32
        return lambda stop: model.create_chat_completion(messages, cancel=stop, **{**args, "seed": seed})

    try:
        results = await asyncio.gather(*(state.scheduler.run(answer(i), t) for i, t in enumerate(tickets)))
    except BaseException as e:
        for ticket in tickets:
            ticket.cancel.set()
        return _failed(e)
    finally:
        watcher.cancel()
    merged = dict(results[0])
    merged["choices"] = [{**r["choices"][0], "index": i} for i, r in enumerate(results)]
    usage = dict(merged["usage"])
    usage["completion_tokens"] = sum(r["usage"]["completion_tokens"] for r in results)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    merged["usage"] = usage
    return JSONResponse(_named(merged, state.config.model_id))


def _failed(e: BaseException) -> Response:
    """What a request that failed in the engine answers: nothing for a client that has gone (499), the
    engine's refusal in OpenAI's shape, anything else raised on."""
    if isinstance(e, Cancelled):
        return Response(status_code=499)  # the client has gone: nobody reads this
    if isinstance(e, QwenVLError):
        raise engine_error(e) from None
    raise e


async def _watch_disconnect(request: Request, *tickets: Ticket) -> None:
    """Set the tickets' cancel events the moment the client goes away (the server's ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for ticket in tickets:
        ticket.cancel.set()


async def _head(chunks: AsyncIterator[dict]) -> list[dict]:
    """The chunks up to the first one with content or a finish reason (the role chunk alone says nothing
    about whether the prompt was accepted)."""
    head: list[dict] = []
    async for chunk in chunks:
        head.append(chunk)
        if any(c.get("finish_reason") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            break
    return head


async def _chain(head: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _sse(head: list[dict], chunks: AsyncIterator[dict], include_usage: bool, model_id: str,
               ticket: Ticket, watcher: asyncio.Task) -> AsyncIterator[bytes]:
    """Server-sent events: one ``data:`` per chunk, the usage chunk when asked, ``data: [DONE]``; an
    error after the first chunk becomes an ``error`` event (the status line is already sent)."""
    usage, last = None, None
    try:
        async for chunk in _chain(head, chunks):
            last = _named(chunk, model_id)
            usage = last.pop("usage", None) or usage
            yield _event(last)
        if include_usage and usage is not None and last is not None:
            yield _event({**{k: last[k] for k in ("id", "object", "created", "model")}, "choices": [], "usage": usage})
    except APIError as e:
        yield sse_error(e)
    except QwenVLError as e:
        yield sse_error(engine_error(e))
    except Exception as e:
        log.exception("generation failed mid-stream")
        yield sse_error(APIError(500, f"the generation failed: {type(e).__name__}", type="server_error"))
    finally:
        ticket.cancel.set()
        watcher.cancel()
    yield b"data: [DONE]\n\n"


def _event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _named(result: dict, model_id: str) -> dict:
    """The engine's dict with the served model id (clients match it against /v1/models)."""
    return {**result, "model": model_id}
