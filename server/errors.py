"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, for every refusal.

Clients (the ``openai`` package, chat front-ends) map the HTTP status to an exception class and
show ``message``; so each refusal here carries the status a client expects and a one-line
message that names the offending field.
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """A request the server refuses: status, message and OpenAI's ``type`` / ``param`` / ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def busy(retry_after_s: int, message: str = "the server is busy: too many requests are waiting") -> APIError:
    return APIError(503, message, type="server_busy", code="server_busy",
                    headers={"Retry-After": str(retry_after_s)})


def sse_error(err: APIError) -> bytes:
    """A mid-stream failure as an SSE ``error`` event (the ``openai`` client raises it as ``APIError``)."""
    return b"event: error\ndata: " + json.dumps(err.body()).encode() + b"\n\n"
