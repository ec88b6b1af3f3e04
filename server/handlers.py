"""Every failure as OpenAI's error response: the server's own refusals, pydantic's shape errors, unknown
paths, what the engine raised, and bugs (500, logged with their traceback).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenvl_edge.errors import ImageError, OptionError, PromptError, QwenVLError
from qwenvl_edge.runtime.serial import ClosedError
from qwenvl_edge.server.errors import APIError, bad_request, error_body
from qwenvl_edge.server.schema import FIELD_NAMES

log = logging.getLogger("qwenvl_edge.server")


ENGINE_PARAMS = re.compile(r"(messages\[\d+\]|max_tokens|temperature|top_p|top_k|stop|seed|response_format"
                           r"|logprobs|top_logprobs)\b")


def engine_error(e: QwenVLError) -> APIError:
    """What the engine raised, as the client should see it. Its checks of the request (prompt, image,
    options; all before any evaluation) are 400, with the argument its message starts with as ``param``
    and a prompt over the context named as such; a closed engine is 503; anything else (say, the bundle
    changed under the server) is the server's fault: 500."""
    message = str(e)
    if isinstance(e, (PromptError, ImageError, OptionError)):
        code = "context_length_exceeded" if "context" in message.lower() else None
        m = ENGINE_PARAMS.match(message)
        return bad_request(message, param=m.group(1) if m else None, code=code)
    if isinstance(e, ClosedError):
        return APIError(503, "the server is shutting down", type="unavailable_error", code="shutting_down")
    log.error("engine error: %s", message)  # the details (paths) stay in the server's log
    return APIError(500, f"the engine failed ({type(e).__name__}); the server's log says why", type="server_error",
                    code="engine_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(e), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, codes.get(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(QwenVLError)
    async def engine_refused(_request: Request, e: QwenVLError) -> JSONResponse:
        err = engine_error(e)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def _validation_body(e: RequestValidationError) -> dict:
    """Pydantic's first complaint as one line, with OpenAI's ``param`` path (``messages[0].content``)."""
    # a union (content: str | list of parts) reports each member; the deepest complaint is the telling one
    first = max(e.errors(), key=lambda err: len(err.get("loc", ())), default={"loc": (), "msg": "invalid request"})
    loc: list = []
    for p in first.get("loc", ())[1:]:  # [0] is "body"; union members ("str", "float") and tags are no fields
        if isinstance(p, int) or (p in FIELD_NAMES and (not loc or loc[-1] != p)):
            loc.append(p)
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "json_invalid":
        return error_body("the request body is not valid JSON", "invalid_request_error", None, "invalid_json")
    msg = first.get("msg", "invalid value")
    return error_body(f"{param}: {msg}" if param else msg, "invalid_request_error", param, "invalid_value")
