"""The request-body limit, enforced while the body arrives (413 before a big body is ever parsed).

A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as it
comes and refused when it passes the limit. The body is then replayed to the app, and later
``receive`` calls go to the server, so disconnects are still seen.
"""

from __future__ import annotations

import json

from qwenvl_edge.server.errors import error_body


class BodyLimit:
    """Pure ASGI middleware: refuses request bodies over ``max_bytes`` with OpenAI's 413 shape."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"the request body is larger than this server's limit of "
                                     f"{self.max_bytes / 2**20:g} MB", "invalid_request_error", None,
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
