"""Compiles structured-output grammars within bounds, so that one tenant's grammar cannot cost
another tenant's requests time or the pod its memory.

- llguidance's own limits (`LIMITS`) bound what one grammar may build: the lexer work of the
  compile and first mask (`initial_lexer_fuel`), of each later mask (`step_lexer_fuel`,
  `step_max_items`), the lexer states it keeps (`max_lexer_states`), the grammar's size.
  A grammar past them fails its compile or first mask (400 `grammar_too_complex`), or, past a
  step limit while generating, allows only EOS from then on (structured_output.py).
- The compile and the FIRST mask (where llguidance builds the lexer) run on `workers` threads of
  their own (at most that many at once), never on the step thread. `compile_within` waits
  `timeout` seconds: a grammar not ready by then is refused with 400 `grammar_too_complex` (and,
  by its digest, for a while after); a request that found no free worker, or no room in the
  budget, in that time gets 503 `grammar_busy`. llguidance cannot be interrupted: a late worker runs on until its fuel ends,
  and its grammar is dropped.
- Compiled grammars are kept for reuse within `cache_bytes`, each charged the heap growth its
  compile and first mask measured. The same budget also counts the grammars that were evicted
  but are still held by running sequences (their lexers stay alive with them): while those alone
  fill it, new grammars wait, then get 503 `grammar_busy`. Memory for grammars is therefore at
  most about `cache_bytes` plus `workers` grammars being compiled.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import threading
import time
import weakref
from collections import OrderedDict

from loraplex.engine.core.structured_output import (CompiledGrammar, GrammarBusyError, GrammarError, GrammarSpec,
                                                    GrammarTooComplexError)

log = logging.getLogger("loraplex.engine")

MAX_GRAMMAR_CHARS = 256 * 1024
# llguidance.LLParserLimits. Measured on the test model (384 tokens, one core): a nested counted
# repetition such as a{1000}{1000} took 1.3-1.7 s and ~206 MiB at its first mask under the
# defaults (1M initial fuel); at 200k it stops after ~0.3-0.5 s and ~45 MiB. A 400-property JSON
# schema needs 50-100k. The step limits are llguidance's defaults (~14 ms and ~2.5 ms a mask at
# most); the lexer states, 20k at ~1-2 KiB each, cap how far a grammar's lexer grows while it
# generates (the default, 250k, is up to ~500 MiB).
LIMITS = dict(initial_lexer_fuel=200_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=20_000, max_grammar_size=500_000, verbose_errors=False)
REJECTED_SIZE = 1024  # digests of grammars refused for their cost, answered at once
MIN_CHARGE = 64 * 1024  # a compiled grammar is never charged less than this
ROOM_MESSAGE = "the structured-output memory budget is held by running requests; retry later"


def _glibc():
    """(glibc's mallinfo2 as a reader of the bytes allocated by all threads, its malloc_trim), or
    Nones where the C library has neither."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None, None
    mallinfo2.restype = MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # small blocks in use + mmapped large ones

    return read, trim


# malloc_trim after an eviction: a lexer's many small blocks, once freed, otherwise stay in the
# process (measured: RSS plateaued ~600 MiB with it off, ~420 MiB on, for a 256 MiB budget).
_heap_bytes, _malloc_trim = _glibc()


class GrammarCompiler:
    """Compiles grammars for one tokenizer (thread-safe); see the module docstring. The
    llguidance tokenizer (about 0.5 s for a 49k vocabulary) is built on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], *,
                 cache_bytes: int = 256 << 20, workers: int = 2, limits: dict | None = None):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_bytes = cache_bytes
        self.limits = {**LIMITS, **(limits or {})}
        self._lock = threading.RLock()  # a grammar freed under it releases its bytes under it
        self._tokenizer = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()  # grammar text -> compiled
        self.cached_bytes = 0  # charged to the grammars in the cache
        self.live_bytes = 0  # charged to every grammar alive: cached, or held by a sequence
        self._rejected: OrderedDict[str, str] = OrderedDict()  # spec digest -> why it was refused
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="loraplex-grammar")
        self.compiles = 0  # cache misses, for tests and metrics

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None)
        return self._tokenizer

    # ---- on the event loop ------------------------------------------------------------------

    async def compile_within(self, spec: GrammarSpec, timeout: float) -> CompiledGrammar:
        """spec compiled, its first mask included, on a worker thread; raises GrammarError (400),
        GrammarTooComplexError (400) when not ready in `timeout` s, GrammarBusyError (503) when
        no worker or no room in the budget was free in that time."""
        self._check_rejected(spec)  # at once, without waiting for a worker
        waiting = threading.Event()  # set while the job waits for room in the budget
        job = self._pool.submit(self.compile, spec, time.monotonic() + timeout, waiting)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), timeout)
        except asyncio.CancelledError:  # the client left: a started compile still ends in the cache
            job.cancel()
            raise
        except asyncio.TimeoutError:
            pass
        if job.cancel():  # it never started: no worker was free
            raise GrammarBusyError(f"every structured-output compile worker was busy for {timeout:g} s; "
                                   "retry later", param=spec.param)
        if waiting.is_set():  # no room in the budget yet (the job gives up at the same deadline)
            raise GrammarBusyError(ROOM_MESSAGE, param=spec.param)
        message = f"the grammar was not ready within {timeout:g} s (its compile and first token mask)"
        log.warning("structured output: a %s grammar (%s) missed the %g s time-out; refused", spec.kind,
                    spec.key[:12], timeout)
        self._reject(spec, message)
        job.add_done_callback(self._drop_late)  # once it ends, its grammar is not kept
        raise GrammarTooComplexError(message, param=spec.param)

    def _drop_late(self, job: concurrent.futures.Future) -> None:
        if not job.cancelled() and job.exception() is None:
            with self._lock:
                compiled = self._cache.pop(job.result().text, None)
                if compiled is not None:
                    self.cached_bytes -= compiled.nbytes
                del compiled

    # ---- on a worker thread -----------------------------------------------------------------

    def compile(self, spec: GrammarSpec, deadline: float | None = None,
                waiting: threading.Event | None = None) -> CompiledGrammar:
        """spec compiled with its first mask (or from the cache). Raises GrammarError with the
        reason when it does not compile, GrammarTooComplexError past a limit. Blocks (for as long
        as the limits allow): call it off the event loop and the step loop."""
        from llguidance import LLMatcher, LLParserLimits

        self._check_rejected(spec)
        try:
            text = spec.grammar()
        except ValueError as exc:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {exc}", param=spec.param) from None
        if len(text) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the grammar is larger than {MAX_GRAMMAR_CHARS} characters", param=spec.param)
        with self._lock:
            compiled = self._cache.get(text)
            if compiled is not None:
                self._cache.move_to_end(text)
                return compiled
            tokenizer = self._ll_tokenizer()
        self._wait_for_room(spec, deadline, waiting)
        before = _heap_bytes() if _heap_bytes else 0
        matcher = LLMatcher(tokenizer, text, log_level=0, limits=LLParserLimits(**self.limits))  # drops the GIL
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {matcher.get_error()}", param=spec.param)
        # The first mask builds the lexer (the costly part of a counted repetition); copies share it.
        matcher.compute_bitmask()
        if matcher.is_error():
            message = f"the grammar is too complex (past the structured-output limits): {matcher.get_error()}"
            self._reject(spec, message)
            raise GrammarTooComplexError(message, param=spec.param)
        grown = (_heap_bytes() - before) if _heap_bytes else 64 * len(text)  # no mallinfo2: a guess from the text
        compiled = CompiledGrammar(matcher, self.eos_token_ids, text, max(grown, 8 * len(text), MIN_CHARGE))
        self._keep(compiled)
        return compiled

    def _wait_for_room(self, spec: GrammarSpec, deadline: float | None, waiting: threading.Event | None) -> None:
        """Wait until the grammars alive leave room in the budget; GrammarBusyError at the deadline."""
        while True:
            with self._lock:
                if self.live_bytes - self.cached_bytes < self.cache_bytes:  # evicting the cache would do
                    if waiting is not None:
                        waiting.clear()
                    return
            if waiting is not None:
                waiting.set()
            if deadline is None or time.monotonic() >= deadline:
                raise GrammarBusyError(ROOM_MESSAGE, param=spec.param)
            time.sleep(0.05)

    def _keep(self, compiled: CompiledGrammar) -> None:
        evicted = 0
        with self._lock:
            self.compiles += 1
            self.live_bytes += compiled.nbytes
            weakref.finalize(compiled, self._release, compiled.nbytes)
            previous = self._cache.pop(compiled.text, None)  # two workers compiled the same text
            if previous is not None:
                self.cached_bytes -= previous.nbytes
            del previous
            self._cache[compiled.text] = compiled
            self.cached_bytes += compiled.nbytes
            # Least recently used first, until the grammars alive fit (an evicted grammar a sequence
            # still holds stays alive, and so counted); the newest stays, even alone past the budget.
            while self.live_bytes > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self.cached_bytes -= old.nbytes
                evicted += 1
                del old  # freed now unless a sequence holds it (weakref.finalize -> _release)
        if evicted and _malloc_trim is not None:
            _malloc_trim(0)  # on this worker thread, never the step thread

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes

    def _check_rejected(self, spec: GrammarSpec) -> None:
        rejected = self._rejected.get(spec.key)
        if rejected is not None:
            raise GrammarTooComplexError(rejected, param=spec.param)

    def _reject(self, spec: GrammarSpec, message: str) -> None:
        with self._lock:
            self._rejected[spec.key] = message
            self._rejected.move_to_end(spec.key)
            while len(self._rejected) > REJECTED_SIZE:
                self._rejected.popitem(last=False)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
