"""The engine on two background threads, with an asyncio face for the HTTP layer.

- The step loop thread alone touches the scheduler and the model: it takes commands (add,
  abort, call), runs `LLMEngine.step_core()`, and hands each step's `CoreOutput` batch, once,
  to the output thread.
- The output thread alone touches the `OutputProcessor` (detokenization, stop strings, deltas)
  and delivers RequestOutputs to the callers' asyncio queues, one `call_soon_threadsafe` per
  event loop per step. Requests that end on the text side (a stop string) go back to the step
  loop as aborts, so they stop generating.

Validation and tokenization run in the caller (so a bad request fails before it is queued);
admission (the queue-full check) runs on the step loop, which alone reads the scheduler's
queues: `submit` returns once the loop took the request, or raises what refused it. Leaving a
stream early (a client disconnect) aborts the request, which frees its KV blocks at the next
loop turn. Every message for a request travels the same two queues in order, so its
registration with the output thread always comes before its acceptance and its first output.

Everything the HTTP layer needs is on `AsyncEngine` (facts, validation, adapters, submit,
abort); it never reaches into `LLMEngine`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from loraplex.engine.core.adapters.manager import AdapterManager
from loraplex.engine.core.llm_engine import LLMEngine
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import CoreOutput, RequestOutput, Sequence

log = logging.getLogger("loraplex.engine")

Listener = tuple[asyncio.AbstractEventLoop, asyncio.Queue]  # where a request's outputs go
ACCEPTED = "accepted"  # the first item of every request's queue once the step loop took it


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
        self._listeners: dict[str, Listener] = {}  # output thread only
        self._unregistered: set[str] = set()  # output thread only: requests whose text could not start
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
    def is_alive(self) -> bool:
        """Both threads run and the engine can still step (a tensor-parallel worker may have died)."""
        return self._thread.is_alive() and self._output_thread.is_alive() and self.engine.failure is None

    # ---- the public face: facts the HTTP layer reads (immutable after start-up) ----------

    @property
    def served_model_name(self) -> str:
        return self.engine.served_model_name

    @property
    def model_id(self) -> str:
        return self.engine.config.model_id

    @property
    def config(self):
        """The EngineConfig (read-only)."""
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.engine.eos_token_ids

    @property
    def device(self):
        return self.engine.device

    @property
    def boot_id(self) -> str:
        return self.engine.boot_id

    @property
    def failure(self) -> str | None:
        """Why the engine cannot go on (a tensor-parallel worker died), or None."""
        return self.engine.failure

    @property
    def tokenizer(self):
        """The calling thread's own copy of the HF tokenizer (chat templates, token texts)."""
        return self.engine.tokenizer

    @property
    def adapters(self) -> AdapterManager:
        """The adapter interface (thread-safe): manifests, registration, resolution by name,
        failures, tiers. Requests name adapters; this is how names become adapters."""
        return self.engine.adapters

    def is_base(self, name: str | None) -> bool:
        """Whether a requested model name means the base model (no name, its served name or id)."""
        return not name or name in (self.engine.served_model_name, self.engine.config.model_id)

    def stats(self) -> dict:
        """Queue lengths and KV usage: plain reads for metrics, no mutation."""
        return self.engine.stats()

    def tenant_stats(self) -> dict[str, dict]:
        """Per tenant with work: waiting and running counts and the fair-share counter (plain reads)."""
        return self.engine.scheduler.tenant_stats()

    def describe(self) -> dict:
        """What /info reports about the model and its memory."""
        engine, cfg = self.engine, self.engine.config
        return {
            "architecture": engine.model_config.architecture,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": str(engine.device),
            "adapter_slots": engine.adapters.num_slots,  # after the device byte budget
            "max_model_len": engine.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "tensor_parallel_worker_pids": engine.workers.pids if engine.workers is not None else [],
            "quantization": "fp8" if engine.model_config.fp8_block else None,
            "weight_bytes": engine.runner.model.weight_bytes,
            "weight_bytes_unquantized": engine.runner.model.weight_bytes_unquantized,
        }

    # ---- caller side (event loop, or a worker thread for validation) ----------------------

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, validated (RequestError on bad input). Blocking: off the loop."""
        return self.engine.prompt_ids(prompt)

    def make_sequence(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                      request_id: str | None = None, validated_ids: list[int] | None = None) -> Sequence:
        """Validate now; raises RequestError subclasses that map to 4xx."""
        return self.engine.make_sequence(request_id or uuid.uuid4().hex, prompt, params, adapter,
                                         validated_ids=validated_ids)

    async def submit(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Queue a validated sequence; return once the step loop took it (its outputs follow in
        the returned stream), or raise what refused it (QueueFullError: the queue is full).
        Closing the stream before it finishes aborts the request."""
        q: asyncio.Queue = asyncio.Queue()
        self._texts.put(("add", seq, (asyncio.get_running_loop(), q)))
        self._commands.put(("add", seq))
        try:
            first = await q.get()
        except BaseException:  # cancelled while waiting: the loop may have taken it
            self.abort(seq.request_id)
            raise
        if isinstance(first, Exception):
            raise first
        return self._outputs(seq, q)

    async def _outputs(self, seq: Sequence, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
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

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """submit, then yield the outputs until the request finishes."""
        outputs = await self.submit(seq)
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()

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
            try:
                self.engine.add_sequence(arg)  # the one queue-full check, on the scheduler's thread
            except Exception as exc:
                self._texts.put(("refused", arg.request_id, exc))
            else:
                self._texts.put(("accepted", arg.request_id))
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
                    self._send([(self._listeners.pop(request_id, None), exc)])
                elif kind == "accepted":
                    listener = self._listeners.get(message[1])
                    self._send([(listener, ACCEPTED)])
                elif kind == "step":
                    self._process(message[1])
            except Exception:  # a bug outside any one request's text: log it, keep serving
                log.exception("output thread error on a %r message", kind)

    def _register(self, seq: Sequence, listener: Listener) -> None:
        try:
            self.processor.add_request(seq)
        except Exception as exc:  # e.g. its prompt cannot be decoded: fail it alone
            log.exception("text handling could not start for request %s", seq.request_id)
            self._unregistered.add(seq.request_id)  # aborted when its first output shows it was queued
            self._send([(listener, RuntimeError(f"internal error in text handling: {exc}"))])
            return
        self._listeners[seq.request_id] = listener

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
            listener = self._listeners.pop(out.request_id, None) if out.finished else self._listeners.get(out.request_id)
            deliveries.append((listener, out))
        self._send(deliveries)

    @staticmethod
    def _send(deliveries: list[tuple[Listener | None, RequestOutput | Exception | str]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for listener, item in deliveries:
            if listener is not None:
                by_loop.setdefault(listener[0], []).append((listener[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass
