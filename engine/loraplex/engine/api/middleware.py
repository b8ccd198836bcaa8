"""What reaches the routes: requests a browser cannot forge from another site, and bodies
under a size cap (pure ASGI, so streaming responses are untouched).

`RequestGuardMiddleware` (every POST/PUT/PATCH/DELETE): a cross-site request is refused with 403
unless its Origin is in --allowed-origins, and a body must be sent as `application/json` (415
otherwise). A web page on another site can make a browser send a form or `text/plain` body with
no preflight (CSRF); a JSON content type always needs a preflight, which this server answers
only for --allowed-origins (CORS). Clients that are not browsers send no Origin.

`BodyLimitMiddleware`: the size cap, applied before any parsing.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit

from loraplex.engine.api.errors import APIError

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


async def send_error(send, err: APIError, close: bool = False) -> None:
    """Answer with `err` in the API's error shape (from middleware, before any route)."""
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": err.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": payload})


def same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names this server as the request reached it (its Host header);
    a port left out on either side is the origin scheme's default."""
    try:
        o, h = urlsplit(origin), urlsplit("//" + host)
        default = DEFAULT_PORTS.get(o.scheme)
        return bool(o.hostname) and o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:  # a malformed port
        return False


class RequestGuardMiddleware:
    """403 for cross-site unsafe requests (unless allowed), 415 for bodies that are not JSON."""

    def __init__(self, app, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.allow_all = "*" in allowed_origins
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        err = self.cross_site(headers) or self.not_json(headers)
        if err is not None:
            return await send_error(send, err, close=True)
        return await self.app(scope, receive, send)

    def cross_site(self, headers: dict[str, str]) -> APIError | None:
        origin = headers.get("origin")
        fetch_site = headers.get("sec-fetch-site", "").lower()
        if self.allow_all or (origin is not None and origin.rstrip("/").lower() in self.allowed):
            return None
        if fetch_site == "cross-site" or (
                origin is not None and not same_origin(origin, headers.get("host", ""))):
            return APIError(403, f"cross-origin request refused: origin {origin or '(none)'!r} is not in "
                            "--allowed-origins", code="cross_origin_forbidden")
        return None

    @staticmethod
    def not_json(headers: dict[str, str]) -> APIError | None:
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and media_type != "application/json":
            return APIError(415, f"request bodies must be sent as 'Content-Type: application/json', got "
                            f"{media_type or 'no Content-Type'!r}", code="unsupported_media_type")
        return None


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
        for name, value in scope.get("headers", ()):
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
        await send_error(send, APIError(413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                        code="body_too_large"), close=True)
