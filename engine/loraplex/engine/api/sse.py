"""Server-sent events and client disconnects: the transport under streamed answers."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from loraplex.engine.api.errors import ClientGone


# What json.dumps(data, ensure_ascii=False, separators=(",", ":")) builds on every call, built
# once: an event per token per stream is encoded with it.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(data: Any) -> str:
    return f"data: {_encode(data)}\n\n"


def sse_event(kind: str, data: Any) -> str:
    """A named event (`event: kind`), as the Responses API streams them."""
    return f"event: {kind}\ndata: {_encode(data)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, at once, when the response
    ends for any reason (a client disconnect included), so the generator's cleanup (aborting
    the engine sequences, freeing their KV blocks) never waits for garbage collection."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def sse_response(body: AsyncIterator[str], headers: dict[str, str] | None = None) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


async def until_disconnect(request: Request, coro):
    """Await coro; if the client disconnects first, cancel it (which aborts its sequences) and
    raise ClientGone."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
