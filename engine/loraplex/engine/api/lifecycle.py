"""One request's life, the same for every inference route (OpenAI completions and chat, the
Responses API, LoRAX). A route parses its body into a `WireFormat` (the translation between
its wire shapes and this lifecycle) and returns `await InferenceCall(state, request, wire).respond()`:

    prepare   who calls (API key, tenant) -> which model (base, adapter, just in time by name)
              -> the wire format's own checks and grammar -> prompts templated, tokenized and
              validated once, on the prepare pool (never on the event loop) -> the tenant's
              quotas admit it (429 with Retry-After otherwise); its sequences carry the tenant
              and its weight, for the scheduler's fair share
    submit    every sequence taken by the step loop, or refused (429 queue full) before a byte
              of the answer is sent; OpenAI's x-ratelimit-* headers go on every answer, and
              x-loraplex-adapter-revision on every answer of a revisioned adapter
    stream    the n sequences' outputs merged in arrival order, accumulated per choice, shaped
      or      by the wire format into SSE events (those of outputs already delivered together go
    collect   out in one write); or, not streamed, run to the end and answered in one body. A
              client that leaves aborts its sequences (KV blocks freed at once).
    finish    exactly once, on every path (success, error, disconnect): the quota settled with
              the tokens used and its concurrency released, metrics, the usage record, spans.

The call talks to the engine only through `AsyncEngine`'s public interface.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loraplex.engine.api import tracing
from loraplex.engine.api.errors import APIError, ClientGone, as_api_error
from loraplex.engine.api.fault_injection import delay_for
from loraplex.engine.api.metrics import UNKNOWN, RequestTimer
from loraplex.engine.api.model_resolution import SESSION_HEADER, ServedModel, aborted_error, resolve_model
from loraplex.engine.api.quotas import Admission, RateLimited
from loraplex.engine.api.sse import sse_response, until_disconnect
from loraplex.engine.api.state import ServerState
from loraplex.engine.api.structured import compile_grammar
from loraplex.engine.api.usage import UsageRecord, wall_time
from loraplex.engine.core.async_engine import AsyncEngine, OutputStream
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import RequestOutput, RequestResult, Sequence

REVISION_HEADER = "x-loraplex-adapter-revision"


class WireFormat:
    """What a route supplies to the lifecycle: its request's meaning and its answer's shapes.
    Hooks run in the order listed; `prompts` and `sampling` run on the prepare pool."""

    id_prefix = "req"
    stream = False
    n = 1  # choices per prompt

    # ---- the request ---------------------------------------------------------------------

    async def model_name(self, call: "InferenceCall") -> str | None:
        """The model (base or adapter name) to serve; LoRAX registers or merges adapters here."""
        raise NotImplementedError

    def session(self, call: "InferenceCall") -> str | None:
        """The body's session for a revisioned adapter's sticky split (OpenAI's `user`); the
        x-session-id header comes first."""
        return None

    def prepare(self, call: "InferenceCall"):
        """Checks that need the model, before tokenization; returns the structured-output
        GrammarSpec or None."""
        return None

    def prompts(self, call: "InferenceCall") -> list[str | list[int]]:
        raise NotImplementedError

    def sampling(self, call: "InferenceCall", i: int) -> SamplingParams:
        """Choice i's parameters (i < n); call.grammar is compiled by now."""
        raise NotImplementedError

    def error_param(self, param: str | None) -> str | None:
        """An error's `param` as this wire format's callers name the field."""
        return param

    # ---- the answer ----------------------------------------------------------------------

    def answer(self, call: "InferenceCall", results: list[RequestResult]) -> Any:
        """The JSON body of a non-streamed answer."""
        raise NotImplementedError

    def opening(self, call: "InferenceCall") -> Iterable[str]:
        return ()

    def events(self, call: "InferenceCall", index: int, out: RequestOutput, first: bool) -> Iterable[str]:
        """SSE events for one output of choice `index` (already accumulated in call.results)."""
        raise NotImplementedError

    def closing(self, call: "InferenceCall") -> Iterable[str]:
        return ()

    def failure(self, call: "InferenceCall", err: APIError) -> Iterable[str]:
        """SSE events for an error after the stream began (its status is already 200)."""
        raise NotImplementedError


def make_sequences(engine: AsyncEngine, request_id: str, prompts: list[str | list[int]], n: int,
                   make_params, adapter: str | None) -> list[Sequence]:
    """prompts x n sequences (choice index = prompt index * n + i). `make_params(i)` gives the
    i-th choice's SamplingParams. Each prompt is tokenized and validated once, however many
    choices share it. Blocking: call it off the event loop. Raises RequestError before anything
    is queued."""
    seqs = []
    for p_idx, prompt in enumerate(prompts):
        ids = engine.prompt_ids(prompt)
        for i in range(n):
            index = p_idx * n + i
            seqs.append(engine.make_sequence(prompt, make_params(i), adapter, request_id=f"{request_id}-{index}",
                                             validated_ids=ids))
    return seqs


class InferenceCall:
    """One inference request from its parsed body to its last byte."""

    def __init__(self, state: ServerState, request: Request, wire: WireFormat):
        self.state, self.request, self.wire = state, request, wire
        self.timer = RequestTimer(state.metrics, UNKNOWN)
        self.request_id = f"{wire.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.received = time.time()
        self.engine: AsyncEngine | None = None
        self.principal = None
        self.model: ServedModel | None = None
        self.grammar = None  # the CompiledGrammar of the request's structured output, if any
        self.seqs: list[Sequence] = []
        self.results: list[RequestResult] = []
        self._streams: list[OutputStream] = []
        self._merge_queue: asyncio.Queue | None = None  # n > 1: the sequences' outputs, merged
        self.admission: Admission | None = None  # the tenant's quotas, once admitted
        self.rate_limit: str | None = None  # the quota that refused it
        self._submitted = False
        self._finished = False

    # ---- the whole life ------------------------------------------------------------------

    async def respond(self) -> Response:
        await self.prepare()
        await self.submit()
        if self.wire.stream:
            return sse_response(self._stream(), self.answer_headers())
        try:
            results = await until_disconnect(self.request, self.collect())
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(self.wire.answer(self, results), headers=self.answer_headers())

    async def prepare(self) -> None:
        try:
            self.engine = self.state.require_engine()
            self.principal = self.state.auth.inference(self.request)
            name = await self.wire.model_name(self)
            session = self.request.headers.get(SESSION_HEADER) or self.wire.session(self)
            self.model = await resolve_model(self.engine, self.state.auth, self.principal, name, session=session)
            self.timer.label = self.state.metrics.adapter_label(self.model.adapter_name or self.model.name)
            self.timer.revision = self.model.revision
            if delay := delay_for(self.state.settings.inject_delay, self.model.adapter, self.model.adapter_name):
                await asyncio.sleep(delay)  # --inject-delay (a rollout drill): before admission, so nothing leaks
            self.grammar = await compile_grammar(self.state, self.wire.prepare(self))
            self.seqs = await self.state.off_loop(self._make_sequences)
            n = self.wire.n  # each distinct prompt counts once, however many choices share it
            self.timer.prompt_tokens = sum(self.seqs[k].num_prompt_tokens for k in range(0, len(self.seqs), n))
            self._admit()
        except (APIError, RequestError) as exc:
            raise self._failed(exc) from None
        self.results = [RequestResult() for _ in self.seqs]

    def _admit(self) -> None:
        """The tenant's quotas, reserving prompt + the most it may generate (settled at finish);
        then tag the sequences for the scheduler's fair share."""
        principal = self.principal
        most_output = sum(s.max_output for s in self.seqs)
        self.admission = self.state.quotas.admit(principal.tenant, principal.settings,
                                                 self.timer.prompt_tokens + most_output)
        for seq in self.seqs:
            seq.tenant, seq.tenant_weight = principal.tenant, principal.settings.weight

    def quota_headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers as of now (none for a tenant without limits)."""
        if self.principal is None:
            return {}
        return self.state.quotas.headers(self.principal.tenant, self.principal.settings)

    def revision_headers(self) -> dict[str, str]:
        """Which revision of a revisioned adapter serves this request (none before resolution)."""
        if self.model is None or self.model.revision is None:
            return {}
        return {REVISION_HEADER: str(self.model.revision)}

    def answer_headers(self) -> dict[str, str]:
        return {**self.quota_headers(), **self.revision_headers()}

    def _make_sequences(self) -> list[Sequence]:
        prompts = self.wire.prompts(self)
        max_n = self.state.settings.max_n
        if len(prompts) * self.wire.n > max_n:
            raise APIError(400, f"prompts x n must be at most {max_n}", param="n")
        return make_sequences(self.engine, self.request_id, prompts, self.wire.n,
                              lambda i: self.wire.sampling(self, i), self.model.adapter)

    async def submit(self) -> None:
        """Every sequence taken by the step loop (at one loop turn), or none: if one is refused,
        those taken are aborted and the refusal is this request's error."""
        taken = await asyncio.gather(*(self.engine.submit(s) for s in self.seqs), return_exceptions=True)
        self._streams = [t for t in taken if not isinstance(t, BaseException)]
        refused = next((t for t in taken if isinstance(t, BaseException)), None)
        if refused is not None:
            await self._close_streams()
            if not isinstance(refused, (APIError, RequestError)):
                self.finish(500)
                raise refused
            raise self._failed(refused)
        self._submitted = True

    async def collect(self) -> list[RequestResult]:
        """Non-streamed: run the sequences to the end."""
        status = 499  # until they end (a disconnect cancels this and leaves it so)
        try:
            async for _ in self.outputs():
                pass
            status = 200
            return self.results
        except (APIError, RequestError) as exc:
            err = self._failed(exc)
            status = err.status
            raise err from None
        finally:
            await self._close_streams()
            self.finish(status)

    async def _stream(self) -> AsyncIterator[str]:
        status = 499  # until the stream completes (a disconnect leaves it so)
        wire = self.wire
        try:
            for event in wire.opening(self):
                yield event
            # Outputs that are already here when one is answered (the client or this loop fell
            # behind the steps, or the n choices of one step) go out in the same write: the same
            # events, but one send through the ASGI stack, h11 and the socket instead of one each.
            # Nothing ever waits to be coalesced.
            pending: list[str] = []
            try:
                async for index, out, first in self.outputs():
                    pending += wire.events(self, index, out, first)
                    if pending and not self._ready():
                        yield "".join(pending)
                        pending = []
            except (APIError, RequestError) as exc:
                err = self._failed(exc)
                status = err.status
                yield "".join([*pending, *wire.failure(self, err)])
                return
            last = "".join([*pending, *wire.closing(self)])
            if last:
                yield last
            status = 200
        finally:
            await self._close_streams()
            self.finish(status)

    # ---- outputs -------------------------------------------------------------------------

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput, bool]]:
        """(choice index, output, first output of that choice), accumulated into self.results
        before it is yielded. An aborted sequence raises its APIError."""
        started = [False] * len(self.seqs)
        async for i, out in self._merged():
            self.results[i].add(out)
            self.timer.tokens(len(out.new_token_ids))
            if out.finished and (out.finish_reason == "abort" or out.error):
                raise aborted_error(self.engine, self.model.adapter, out.error, out.error_code)
            yield i, out, not started[i]
            started[i] = True

    def _ready(self) -> bool:
        """Whether the next output is already delivered (taking it will not wait)."""
        if self._merge_queue is not None:
            return not self._merge_queue.empty()
        return len(self._streams) == 1 and self._streams[0].ready() > 0

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._streams) == 1:
            async for out in self._streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._merge_queue = queue

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out, None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, None, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
        # A stream ends with a finished output or raises, so the queue holds only outputs and
        # errors, and _ready() never mistakes an end marker for an output.
        remaining = len(tasks)
        try:
            while remaining:
                i, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out.finished:
                    remaining -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_streams(self) -> None:
        """Abort whatever has not finished (a no-op for finished sequences)."""
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.aclose()

    # ---- the end -------------------------------------------------------------------------

    def _failed(self, exc: APIError | RequestError) -> APIError:
        err = as_api_error(exc)
        err.param = self.wire.error_param(err.param)
        if isinstance(err, RateLimited):
            self.rate_limit = err.limit
            err.headers = {**self.revision_headers(), **(err.headers or {})}
        elif self.principal is not None:  # every answer says where the tenant's quota stands
            err.headers = {**self.answer_headers(), **(err.headers or {})}
        self.finish(err.status)
        return err

    def finish(self, status: int) -> None:
        """Once per request, whatever ended it: the quota settled and released, metrics, the
        usage record, tracing."""
        if self._finished:
            return
        self._finished = True
        completion = sum(r.completion_tokens for r in self.results)
        if self.admission is not None:
            self.admission.settle(self.timer.prompt_tokens + completion)
            self.admission.release()
        self.timer.completion_tokens = completion
        self.timer.finish(status)
        if self.principal is not None:
            self.state.usage.record(self._usage_record(status, completion))
        if self._submitted:
            tracing.record_sequences(self.seqs, self.engine.served_model_name)

    def _usage_record(self, status: int, completion: int) -> UsageRecord:
        seqs = self.seqs if self._submitted else []
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        starts = [s.first_scheduled_time for s in seqs if s.first_scheduled_time is not None]
        model = self.model
        return UsageRecord(
            tenant=self.principal.tenant, request_id=self.request_id, route=self.request.url.path, status=status,
            adapter=None if model is None else (model.adapter_name or self.engine.served_model_name),
            adapter_digest=None if model is None else model.digest,
            adapter_revision=None if model is None else model.revision,
            prompt_tokens=self.timer.prompt_tokens,
            cached_prompt_tokens=sum(seqs[k].cached_prompt_tokens for k in range(0, len(seqs), self.wire.n)),
            completion_tokens=completion, received_at=self.received,
            started_at=wall_time(min(starts)) if starts else None,
            first_token_at=wall_time(min(firsts)) if firsts else None,
            finished_at=time.time(), rate_limit=self.rate_limit)

    # ---- helpers for wire formats --------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        # A token's text never changes: each is decoded once per server (logprobs name every
        # token of a stream, on the event loop).
        text = self.state.token_texts.get(token_id)
        if text is None:
            text = self.state.token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text
