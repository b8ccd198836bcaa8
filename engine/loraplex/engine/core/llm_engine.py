"""The synchronous engine: wires the parts start-up built, validates requests, runs the step.

Start-up (the checkpoint download, tensor-parallel launch, model loading, KV sizing) is
startup.py's; `LLMEngine(config)` runs it, then wires the scheduler, block manager and adapters.

Two halves, as in vLLM v1:
- the core: `add_sequence`, `abort_core` and `step_core` (schedule -> run the forward and sample
  -> hand off), which hands over one `CoreOutput` batch per step. Only one thread may call these
  (AsyncEngine's step loop does); the queue-full check is `add_sequence`'s, on that thread.
- text: the `OutputProcessor` turns those batches into RequestOutputs (detokenization, stop
  strings). AsyncEngine runs it on a thread of its own; `step()`, `abort()`, `add_request()`
  and `generate()` run both halves in the caller's thread for tests, benchmarks and scripts.

`make_sequence` (with `prompt_ids`) is the one place the engine validates a request. It and
`prompt_ids` are safe to call from any thread: they read only immutable state, so bad requests
are refused before they reach the loop.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
import uuid

from tokenizers import Tokenizer

from loraplex.engine.core.adapters.manager import AdapterManager
from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import AdapterLoadTimeoutError, PromptTooLongError, QueueFullError, RequestError
from loraplex.engine.core.output_processor import OutputProcessor
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from loraplex.engine.core.sequence import CoreOutput, RequestOutput, RequestResult, Sequence
from loraplex.engine.core.startup import EngineParts, start_up

log = logging.getLogger("loraplex.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None):
        """Start up (`startup.start_up`), unless given `parts` already built, and wire the parts."""
        parts = parts if parts is not None else start_up(config)
        self.config = config
        self.boot_id = str(uuid.uuid4())
        self.served_model_name = config.served_model_name or config.model_id.rstrip("/").split("/")[-1]
        self.model_dir, self.model_config = parts.model_dir, parts.model_config
        self.device, self.dtype, self.max_model_len = parts.device, parts.dtype, parts.max_model_len
        self.eos_token_ids = parts.eos_token_ids
        self._tokenizer = parts.tokenizer
        self._thread_tokenizers = threading.local()
        # The output processor decodes with an instance of its own: Rust tokenizers must not be
        # shared across threads (huggingface/tokenizers#537).
        self.output_processor = OutputProcessor(Tokenizer.from_str(parts.tokenizer.backend_tokenizer.to_str()))
        self.workers = parts.workers  # tensor parallel: the worker processes (distributed.WorkerGroup)
        self.runner = parts.runner
        self.block_manager = BlockManager(parts.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.adapters = AdapterManager(config, parts.model, self.model_config, parts.slots_factory)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.adapter_fairness_seconds, config.tenant_scheduling),
                                   self.block_manager, self.adapters)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.last_step_seconds = 0.0

    # ---- requests -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The calling thread's own copy of the HF tokenizer. Prompts are encoded on a thread
        pool, token texts decoded on the event loop, and a Rust tokenizer must not be used from
        two threads at once (huggingface/tokenizers#537). One copy per thread, made on first use."""
        tok = getattr(self._thread_tokenizers, "tokenizer", None)
        if tok is None:
            tok = self._thread_tokenizers.tokenizer = copy.deepcopy(self._tokenizer)
        return tok

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Tokenize and validate a prompt (once, however many choices share it). Raises RequestError."""
        if isinstance(prompt, str) and not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; this model's maximum context length is {self.max_model_len} "
                "(the prompt must leave room for at least one generated token)", param="prompt")
        return ids

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                      adapter: str | None = None, *, validated_ids: list[int] | None = None) -> Sequence:
        """The engine's one validation of a request: its sampling settings, its prompt
        (`prompt_ids`), prompt + max_tokens within the context, logit_bias within the vocabulary,
        its adapter servable. Raises RequestError (a 4xx) for bad input.
        `validated_ids`: the prompt's ids from `prompt_ids`, to skip doing that again."""
        params.validate()
        ids = validated_ids if validated_ids is not None else self.prompt_ids(prompt)
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(ids)} prompt "
                f"tokens plus max_tokens {params.max_tokens} were requested", param="max_tokens")
        vocab = self.model_config.vocab_size
        outside = [t for t in params.logit_bias or () if not 0 <= t < vocab]
        if outside:
            raise RequestError(f"logit_bias token ids must be in [0, {vocab}), got {outside[0]}", param="logit_bias")
        if adapter is not None:
            self.adapters.check_servable(adapter)
        return Sequence(request_id, ids, params, self.max_model_len, eos_token_ids=self.eos_token_ids, adapter=adapter)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a validated sequence. On the step loop's thread, so the queue-full check here
        sees the true queue; raises RequestError (duplicate id) or QueueFullError (a 429)."""
        if seq.request_id in self.requests:
            raise RequestError(f"duplicate request id {seq.request_id!r}")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
        self.requests[seq.request_id] = seq
        if seq.adapter is not None:
            self.adapters.want(seq)  # released when seq is admitted, finishes or is aborted
        self.scheduler.add(seq)

    def abort_core(self, request_id: str) -> CoreOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        seq.finish("abort")
        self.scheduler.retire(seq)
        return seq.take_update()

    # both halves in the caller's thread (tests, benchmarks, scripts; not with AsyncEngine)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params, adapter)
        self.add_sequence(seq)
        self.output_processor.add_request(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        core = self.abort_core(request_id)
        outputs = self.output_processor.process([core]).outputs if core is not None else []
        return outputs[0] if outputs else None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One core step, then its text; requests that ended on the text side are aborted."""
        result = self.output_processor.process(self.step_core())
        for request_id in result.finished_early:
            self.abort_core(request_id)
        return result.outputs

    def step_core(self) -> list[CoreOutput]:
        """One step: schedule, run the forward and sample, hand off what changed."""
        t0 = time.perf_counter()
        self.adapters.on_step()  # loaded preloads into device slots
        outputs = self._fail_waiting_on_failed_adapters()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        results = self._run(batch)
        outputs += self._hand_off(batch, results)
        self.num_steps += 1
        self.last_step_seconds = time.perf_counter() - t0
        return outputs

    def _run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, int | None]]:
        """The forward over the mixed batch and sampling: (item, its token or None if it only
        prefilled), in the runner's row order. A failure aborts this batch's requests alone,
        with the error in their output."""
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        try:
            return self.runner.run(batch)
        except Exception as exc:  # a bug or device fault must not take the process down
            log.exception("forward pass failed; aborting the %d requests of this batch", len(batch))
            for item in batch:
                item.seq.error = f"internal error during generation: {exc}"
                item.seq.finish("abort")
            return [(item, None) for item in batch]

    def _hand_off(self, batch: list[ScheduledSeq], results: list[tuple[ScheduledSeq, int | None]]) -> list[CoreOutput]:
        """Append the tokens (engine-side stops), let the scheduler retire and cache blocks, and
        report each sequence that changed; finished ones leave `requests`."""
        for item, token in results:
            if token is not None and not item.seq.is_finished:
                item.seq.append_token(token)
        self.scheduler.finish_step(batch)
        outputs = []
        for item, token in results:
            seq = item.seq
            if token is not None or seq.is_finished:
                outputs.append(seq.take_update())
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        return outputs

    def _fail_waiting_on_failed_adapters(self) -> list[CoreOutput]:
        """A waiting request whose adapter failed to load ends with that error instead of hanging;
        so does one whose adapter is still not loaded --adapter-wait-timeout-seconds after it came."""
        outputs = []
        now = time.monotonic()
        for seq in list(self.scheduler.waiting):
            message = self.adapters.failure(seq.adapter) if seq.adapter else None
            if message is None and self.adapters.load_overdue(seq, now):
                seq.error = (f"adapter {seq.adapter!r} was not loaded within {self.config.adapter_wait_timeout_seconds:g} "
                             "s (--adapter-wait-timeout-seconds); retry later")
                seq.error_code = AdapterLoadTimeoutError.code
            elif message is not None:
                seq.error = f"adapter {seq.adapter!r} failed to load: {message}"
            if seq.error is not None:
                seq.finish("abort")
                self.scheduler.retire(seq)
                self.requests.pop(seq.request_id, None)
                outputs.append(seq.take_update())
        return outputs

    # ---- conveniences -----------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[dict]:
        """Run requests to completion (tests, benchmarks): one dict per prompt, in order, with
        the `RequestResult` fields token_ids, text, finish_reason, logprobs, prompt_logprobs, error."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        results = {f"gen-{uuid.uuid4().hex}": RequestResult() for _ in prompts}
        for rid, prompt, p, a in zip(results, prompts, params_list, adapters):
            self.add_request(rid, prompt, p, a)
        while any(r.finish_reason is None for r in results.values()):
            outputs = self.step()
            if not outputs and not self.scheduler.running:
                time.sleep(0.005)  # adapters still loading off the loop
            for out in outputs:
                if out.request_id in results:
                    results[out.request_id].add(out)
        return [{"token_ids": r.token_ids, "text": r.text, "finish_reason": r.finish_reason, "logprobs": r.logprobs,
                 "prompt_logprobs": r.prompt_logprobs, "error": r.error} for r in results.values()]

    @property
    def failure(self) -> str | None:
        """Why the engine cannot go on (a tensor-parallel worker died), or None."""
        return None if self.workers is None else self.workers.failure

    def shutdown(self) -> None:
        self.adapters.shutdown()
        if self.workers is not None:
            self.workers.shutdown()

    def stats(self) -> dict:
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_ratio": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free,
            "num_blocks": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.block_manager.queries,
            "prefix_cache_hits": self.block_manager.hits,
        }
