"""What the OpenAI and LoRAX routes share: the server state, model resolution with tenant checks,
running n sequences as one request, and the SSE plumbing that aborts on disconnect."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from loraplex.engine.api import tracing
from loraplex.engine.api.auth import Authenticator, Principal
from loraplex.engine.api.errors import APIError, ClientGone, as_api_error
from loraplex.engine.api.metrics import Metrics, RequestTimer
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.core.adapters.sources import registry_name
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.errors import AdapterLoadTimeoutError, RequestError, UnknownAdapterError
from loraplex.engine.core.sequence import RequestOutput, Sequence, TokenLogprob

log = logging.getLogger("loraplex.engine.api")


class ServerState:
    """Everything the routes need; one per app (app.state.server)."""

    def __init__(self, settings: ServerSettings, auth: Authenticator):
        self.settings = settings
        self.auth = auth
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.started = time.time()
        self.metrics = Metrics(lambda: self.engine, settings.max_adapter_metric_labels)
        self.watcher = None  # ManifestWatcher, when --adapter-manifest-file is set
        # Request preparation (chat templates, tokenization, validation) runs here, not on the
        # event loop: a 100k-character prompt takes ~100 ms to tokenize, and every stream waits.
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(
            settings.prepare_workers, thread_name_prefix="loraplex-prepare") if settings.prepare_workers else None

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the engine failed to start: {self.load_error}", code="engine_failed")
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        if not self.engine.is_alive:
            raise APIError(503, "the engine's step loop has stopped", code="engine_dead")
        return self.engine


def get_state(request: Request) -> ServerState:
    return request.app.state.server


@dataclass
class Target:
    adapter: str | None  # None: the base model
    model: str  # the name to echo back in responses
    label: str  # metrics label


def resolve_model(state: ServerState, principal: Principal, model: str | None, param: str = "model") -> Target:
    """Map a requested model name to the base or an adapter, checking the caller may use it.
    A name resolved from the default source (`resolve_dynamic`) maps to its registry entry."""
    engine = state.require_engine().engine
    base = engine.served_model_name
    if model is None or model in ("", base, engine.config.model_id):
        return Target(None, base, state.metrics.adapter_label(base))
    manifest = engine.adapters.manifest(model)
    if manifest is None:
        raise UnknownAdapterError(f"the model {model!r} does not exist", param=param)
    Authenticator.check_adapter(principal, manifest, model, param=param)
    return Target(manifest.name, model, state.metrics.adapter_label(manifest.name))


async def resolve_dynamic(state: ServerState, request: Request, model: str | None, timer: RequestTimer,
                          param: str = "model") -> None:
    """Make an unregistered adapter name servable before the request is validated: look it up in
    the default source (--adapter-source), register and start loading it, off the event loop.
    Who may trigger this is --dynamic-adapters (docs/api.md "Adapters by name"). Errors (400 bad
    path, 404 unknown, 422 not a checkpoint) end the request here, counted in the metrics."""
    engine = state.engine
    if engine is None or not model or model in (engine.engine.served_model_name, engine.engine.config.model_id):
        return
    mgr = engine.engine.adapters
    if mgr.dynamic == "off" or mgr.manifest(model) is not None:
        return
    try:
        principal = state.auth.inference(request)
        if mgr.dynamic == "admin" and not state.auth.may_register(principal):
            raise APIError(404, f"the model {model!r} does not exist (loading adapters by name needs the admin "
                           "token on this server)", code="model_not_found", param=param)
        await wait_for_adapter(state, asyncio.wrap_future(mgr.resolve(model)), model)
    except (APIError, RequestError) as exc:
        err = as_api_error(exc)
        if err.param == "model":
            err.param = param
        timer.finish(err.status)
        raise err from None


async def wait_for_adapter(state: ServerState, work, what: str, param: str = "model"):
    """Await an adapter's resolution or merge for at most --adapter-wait-timeout-seconds, then
    503 `adapter_load_timeout` (with Retry-After). The work itself goes on (shielded): other
    requests for the same name share it, and a retry finds it done."""
    timeout = state.require_engine().engine.config.adapter_wait_timeout_seconds
    try:
        return await asyncio.wait_for(asyncio.shield(work), timeout)
    except asyncio.TimeoutError:
        raise AdapterLoadTimeoutError(f"adapter {what!r} was not ready within {timeout:g} s "
                                      "(--adapter-wait-timeout-seconds); retry later", param=param) from None


def adapter_name_for(adapter_id: str) -> str:
    """adapter_id itself when it is a valid adapter name (a DNS-1123 label), else
    `<slug>-<first 8 hex of its sha256>`: Hub ids like `org/name` get a stable name."""
    return registry_name(adapter_id)


async def off_loop(state: ServerState, fn, *args):
    """Run blocking request preparation on the prepare pool (or inline with --prepare-workers 0,
    the baseline bench/http_prep.py compares against); exceptions come back as raised."""
    if state.prepare_pool is None:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, fn, *args)


def make_sequences(engine: AsyncEngine, request_id: str, prompts: list[str | list[int]], n: int,
                   make_params, adapter: str | None) -> list[Sequence]:
    """prompts x n sequences (choice index = prompt index * n + i). `make_params(i)` gives the
    i-th choice's SamplingParams. Each prompt is tokenized and validated once, however many
    choices share it. Blocking: call it off the event loop. Raises RequestError before anything
    is queued."""
    seqs = []
    for p_idx, prompt in enumerate(prompts):
        ids = engine.engine.prompt_ids(prompt)
        for i in range(n):
            index = p_idx * n + i
            seqs.append(engine.make_sequence(prompt, make_params(i), adapter, request_id=f"{request_id}-{index}",
                                             validated_ids=ids))
    return seqs


def seed_for(seed: int | None, i: int) -> int | None:
    """Choice i of a seeded request uses seed + i, so n choices differ but stay reproducible."""
    return None if seed is None else seed + i


async def merge_streams(engine: AsyncEngine, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Stream several sequences as one: (choice index, output). Closing it aborts them all.
    When it ends, the sequences' trace spans are recorded (a no-op with tracing off)."""
    if len(seqs) == 1:
        agen = engine.stream(seqs[0])
        try:
            async for out in agen:
                yield 0, out
        finally:
            await agen.aclose()
            tracing.record_sequences(seqs, engine.engine.served_model_name)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        agen = engine.stream(seq)
        try:
            async for out in agen:
                queue.put_nowait((i, out, None))
            queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        finally:
            await agen.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    remaining = len(seqs)
    try:
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tracing.record_sequences(seqs, engine.engine.served_model_name)


@dataclass
class ChoiceResult:
    """A sequence's outputs, accumulated."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    error_code: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
            self.error_code = out.error_code


def output_error(state: ServerState, adapter: str | None, error: str | None, code: str | None = None) -> APIError:
    """The error for a request the engine aborted (RequestOutput.error set; `code` its error_code)."""
    if code == AdapterLoadTimeoutError.code:
        return APIError.from_request_error(AdapterLoadTimeoutError(error or "adapter load timed out", param="model"))
    engine = state.engine
    if adapter is not None and engine is not None and engine.engine.adapters.failure(adapter) is not None:
        return APIError(424, error or f"adapter {adapter!r} failed to load", code="adapter_failed", param="model")
    return APIError(500, error or "the request was aborted by the engine", code="internal_error")


async def collect(state: ServerState, seqs: list[Sequence], timer: RequestTimer,
                  adapter: str | None) -> list[ChoiceResult]:
    """Run sequences to the end (non-streamed requests). Raises APIError on engine failures."""
    engine = state.require_engine()
    results = [ChoiceResult() for _ in seqs]
    stream = merge_streams(engine, seqs)
    try:
        async for i, out in stream:
            results[i].add(out)
            timer.tokens(len(out.new_token_ids))
    except RequestError as exc:
        raise APIError.from_request_error(exc) from None
    finally:
        await stream.aclose()
    timer.completion_tokens = sum(r.completion_tokens for r in results)
    for r in results:
        if r.finish_reason == "abort" or r.error:
            raise output_error(state, adapter, r.error, r.error_code)
    return results


def count_prompt_tokens(timer: RequestTimer, seqs: list[Sequence], n: int) -> int:
    """Each distinct prompt counts once, however many choices share it."""
    timer.prompt_tokens = sum(seqs[k].num_prompt_tokens for k in range(0, len(seqs), n))
    return timer.prompt_tokens


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


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


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


def sse_response(body: AsyncIterator[str]) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)
