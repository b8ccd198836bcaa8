"""The engine's step loop on a background thread, with an asyncio face for the HTTP layer.

Validation and tokenization run in the caller (so a bad request fails before it is queued);
the loop thread alone touches the scheduler and the model. Outputs travel back through one
asyncio queue per request. Leaving the stream early (a client disconnect) aborts the request,
which frees its KV blocks at the next loop turn.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from loraplex.engine.core.errors import QueueFullError
from loraplex.engine.core.llm_engine import LLMEngine
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import RequestOutput, Sequence

log = logging.getLogger("loraplex.engine")


class AsyncEngine:
    IDLE_POLL_SECONDS = 0.05  # how often an idle loop still runs adapter housekeeping

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Adds sent but not yet taken by the loop. Two counters, each written by one thread only
        # (a shared `+= 1` / `-= 1` from two threads can lose updates and drift for good).
        self._adds_sent = 0  # caller (event loop) side
        self._adds_taken = 0  # loop thread side
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)
        self.engine.adapters.shutdown()

    @property
    def _pending_adds(self) -> int:
        return self._adds_sent - self._adds_taken

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- caller side (event loop) ---------------------------------------------------------

    def make_sequence(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                      request_id: str | None = None) -> Sequence:
        """Validate now; raises RequestError subclasses that map to 4xx."""
        seq = self.engine.make_sequence(request_id or uuid.uuid4().hex, prompt, params, adapter)
        if len(self.engine.scheduler.waiting) + self._pending_adds >= self.engine.config.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.engine.config.max_waiting} waiting); retry later")
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Queue a validated sequence and yield its outputs until it finishes."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[seq.request_id] = (asyncio.get_running_loop(), q)
        self._adds_sent += 1
        self._commands.put(("add", seq))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(seq.request_id)
            self._streams.pop(seq.request_id, None)

    async def generate(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        seq = self.make_sequence(prompt, params, adapter, request_id)
        async for out in self.stream(seq):
            yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn, *args):
        """Run fn(*args) on the loop thread at the next turn (for tests and maintenance)."""
        done = threading.Event()
        box: dict = {}

        def job():
            try:
                box["value"] = fn(*args)
            except Exception as exc:
                box["error"] = exc
            done.set()

        self._commands.put(("call", job))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # ---- loop thread ---------------------------------------------------------------------

    def _deliver(self, out: RequestOutput | Exception, request_id: str) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _handle(self, command: tuple) -> None:
        kind, arg = command
        if kind == "add":
            self._adds_taken += 1
            try:
                self.engine.add_sequence(arg)
            except Exception as exc:
                self._deliver(exc, arg.request_id)
        elif kind == "abort":
            out = self.engine.abort(arg)
            if out is not None:
                self._deliver(out, arg)
        elif kind == "call":
            arg()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = None if self.engine.scheduler.running else self.IDLE_POLL_SECONDS
                block = not self.engine.scheduler.running
                try:
                    self._handle(self._commands.get(block=block, timeout=timeout))
                except queue.Empty:
                    pass
                while True:  # drain whatever else arrived
                    try:
                        self._handle(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for out in self.engine.step():
                    self._deliver(out, out.request_id)
            except Exception:  # never let the loop die: log, fail what is in flight, go on
                log.exception("engine step loop error; aborting in-flight requests")
                for rid in list(self.engine.requests):
                    out = self.engine.abort(rid)
                    if out is not None:
                        out.error = "internal engine error"
                        self._deliver(out, rid)
