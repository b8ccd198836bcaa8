"""The engine on two background threads, with an asyncio face for the HTTP layer.

- The step loop thread alone touches the scheduler and the model: it takes commands (add,
  abort, call), runs `LLMEngine.step_core()`, and hands each step's `CoreOutput` batch, once,
  to the output thread.
- The output thread alone touches the `OutputProcessor` (detokenization, stop strings, deltas)
  and delivers RequestOutputs to the callers' asyncio queues, one `call_soon_threadsafe` per
  event loop per step. Requests that end on the text side (a stop string) go back to the step
  loop as aborts, so they stop generating.

Validation and tokenization run in the caller (so a bad request fails before it is queued).
Leaving a stream early (a client disconnect) aborts the request, which frees its KV blocks at
the next loop turn. Every message for a request travels the same two queues in order, so its
registration with the output thread always comes before its first output.
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
from loraplex.engine.core.sequence import CoreOutput, RequestOutput, Sequence

log = logging.getLogger("loraplex.engine")

Target = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | Exception]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    IDLE_POLL_SECONDS = 0.05  # how often an idle loop still runs adapter housekeeping

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.processor = engine.output_processor  # the output thread's alone from start() on
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # to the step loop
        self._texts: queue.SimpleQueue = queue.SimpleQueue()  # to the output thread
        self._targets: dict[str, Target] = {}  # output thread only
        self._unregistered: set[str] = set()  # output thread only: requests whose text could not start
        # Adds sent but not yet taken by the loop. Two counters, each written by one thread only
        # (a shared `+= 1` / `-= 1` from two threads can lose updates and drift for good).
        self._adds_sent = 0  # caller (event loop) side
        self._adds_taken = 0  # loop thread side
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_steps, name="engine-step-loop", daemon=True)
        self._output_thread = threading.Thread(target=self._run_outputs, name="engine-output", daemon=True)

    def start(self) -> "AsyncEngine":
        self._output_thread.start()
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)
        self._texts.put(("stop", None))
        self._output_thread.join(timeout=10)
        self.engine.shutdown()

    @property
    def _pending_adds(self) -> int:
        return self._adds_sent - self._adds_taken

    @property
    def is_alive(self) -> bool:
        """Both threads run and the engine can still step (a tensor-parallel worker may have died)."""
        return self._thread.is_alive() and self._output_thread.is_alive() and self.engine.failure is None

    # ---- caller side (event loop, or a worker thread for make_sequence) -------------------

    def make_sequence(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                      request_id: str | None = None, validated_ids: list[int] | None = None) -> Sequence:
        """Validate now; raises RequestError subclasses that map to 4xx."""
        seq = self.engine.make_sequence(request_id or uuid.uuid4().hex, prompt, params, adapter,
                                        validated_ids=validated_ids)
        if len(self.engine.scheduler.waiting) + self._pending_adds >= self.engine.config.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.engine.config.max_waiting} waiting); retry later")
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Queue a validated sequence and yield its outputs until it finishes."""
        q: asyncio.Queue = asyncio.Queue()
        self._texts.put(("add", seq, (asyncio.get_running_loop(), q)))
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

    # ---- step loop thread ----------------------------------------------------------------

    def _handle(self, command: tuple, batch: list[CoreOutput]) -> None:
        kind, arg = command
        if kind == "add":
            self._adds_taken += 1
            try:
                self.engine.add_sequence(arg)
            except Exception as exc:
                self._texts.put(("refused", arg.request_id, exc))
        elif kind == "abort":
            out = self.engine.abort_core(arg)
            if out is not None:
                batch.append(out)
        elif kind == "call":
            arg()

    def _run_steps(self) -> None:
        while not self._stop.is_set():
            batch: list[CoreOutput] = []
            try:
                timeout = None if self.engine.scheduler.running else self.IDLE_POLL_SECONDS
                block = not self.engine.scheduler.running
                try:
                    self._handle(self._commands.get(block=block, timeout=timeout), batch)
                except queue.Empty:
                    pass
                while True:  # drain whatever else arrived
                    try:
                        self._handle(self._commands.get_nowait(), batch)
                    except queue.Empty:
                        break
                batch += self.engine.step_core()
            except Exception:  # never let the loop die: log, fail what is in flight, go on
                log.exception("engine step loop error; aborting in-flight requests")
                for rid in list(self.engine.requests):
                    out = self.engine.abort_core(rid)
                    if out is not None:
                        out.error = "internal engine error"
                        batch.append(out)
            if batch:
                self._texts.put(("step", batch))

    # ---- output thread -------------------------------------------------------------------

    def _run_outputs(self) -> None:
        while True:
            message = self._texts.get()
            kind = message[0]
            if kind == "stop":
                return
            try:
                if kind == "add":
                    self._register(message[1], message[2])
                elif kind == "refused":
                    _, request_id, exc = message
                    self.processor.drop(request_id)
                    self._send([(self._targets.pop(request_id, None), exc)])
                elif kind == "step":
                    self._process(message[1])
            except Exception:  # a bug outside any one request's text: log it, keep serving
                log.exception("output thread error on a %r message", kind)

    def _register(self, seq: Sequence, target: Target) -> None:
        try:
            self.processor.add_request(seq)
        except Exception as exc:  # e.g. its prompt cannot be decoded: fail it alone
            log.exception("text handling could not start for request %s", seq.request_id)
            self._unregistered.add(seq.request_id)  # aborted when its first output shows it was queued
            self._send([(target, RuntimeError(f"internal error in text handling: {exc}"))])
            return
        self._targets[seq.request_id] = target

    def _process(self, batch: list[CoreOutput]) -> None:
        for core in batch:
            if core.request_id in self._unregistered:
                if core.finished:
                    self._unregistered.discard(core.request_id)
                else:
                    self._commands.put(("abort", core.request_id))
        result = self.processor.process(batch)
        for request_id in result.finished_early:  # ended on the text side: stop generating
            self._commands.put(("abort", request_id))
        deliveries = []
        for out in result.outputs:
            target = self._targets.pop(out.request_id, None) if out.finished else self._targets.get(out.request_id)
            deliveries.append((target, out))
        self._send(deliveries)

    @staticmethod
    def _send(deliveries: list[tuple[Target | None, RequestOutput | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for target, item in deliveries:
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
