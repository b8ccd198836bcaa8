"""Request bodies: a size cap applied before any parsing, and JSON as the default content type
(pure ASGI, so streaming responses are untouched)."""
from __future__ import annotations

import json

from loraplex.engine.api.errors import APIError


# Every POST/PUT route takes JSON. `curl -d` sends form encoding, some clients send text/plain:
# read those bodies as the JSON they are instead of failing on the header.
JSON_BY_DEFAULT = (b"", b"application/x-www-form-urlencoded", b"text/plain")


class BodyLimitMiddleware:
    """Bodies over `max_bytes` get 413 (by Content-Length at once, else while reading). The
    body is buffered and replayed to the app; later `receive` calls reach the server as usual,
    so disconnects are still seen."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers", ()))
        content_type = next((v for n, v in headers if n == b"content-type"), b"")
        if content_type.split(b";")[0].strip().lower() in JSON_BY_DEFAULT:
            headers = [(n, v) for n, v in headers if n != b"content-type"] + [(b"content-type", b"application/json")]
            scope = {**scope, "headers": headers}
        for name, value in headers:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._reject(send)
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

        return await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        err = APIError(413, f"request body exceeds the limit of {self.max_bytes} bytes", code="body_too_large")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
