"""The synchronous engine: owns the model, the KV cache, the scheduler and the adapters.

Two halves, as in vLLM v1:
- the core: `add_sequence`, `abort_core` and `step_core` (schedule, forward, sample, engine-side
  stops), which hands over one `CoreOutput` batch per step. Only one thread may call these
  (AsyncEngine's step loop does).
- text: the `OutputProcessor` turns those batches into RequestOutputs (detokenization, stop
  strings). AsyncEngine runs it on a thread of its own; `step()`, `abort()`, `add_request()`
  and `generate()` run both halves in the caller's thread for tests, benchmarks and scripts.

`prompt_ids` and `make_sequence` (validation, tokenization) are safe to call from any thread:
they read only immutable state, so bad requests are refused before they reach the loop.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
import time
import uuid
from pathlib import Path

import torch

from loraplex.engine.core.adapters.device_slots import DeviceSlots, num_slots
from loraplex.engine.core.adapters.manager import AdapterManager
from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import AdapterLoadTimeoutError, PromptTooLongError, QueueFullError, RequestError
from loraplex.engine.core.model_runner import ModelRunner, profile_kv_blocks
from loraplex.engine.core.output_processor import OutputProcessor
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler, SchedulerConfig
from loraplex.engine.core.sequence import CoreOutput, RequestOutput, Sequence
from loraplex.engine.core.distributed import WorkerGroup
from loraplex.engine.core.tp_runner import ShardedDeviceSlots, TPModelRunner
from loraplex.engine.core.tp_worker import LoadSpec
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.loader import load_model
from loraplex.engine.model.parallel import TensorParallel, check_tensor_parallel

log = logging.getLogger("loraplex.engine")


def resolve_model_dir(model_id: str, revision: str | None) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (or found in the cache)."""
    path = Path(model_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.boot_id = str(uuid.uuid4())
        self.model_dir = resolve_model_dir(config.model_id, config.revision)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.served_model_name = config.served_model_name or config.model_id.rstrip("/").split("/")[-1]
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device, self.model_config.torch_dtype)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        # Sliding windows are honoured by the attention (model/attention.py): no cap needed.
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._thread_tokenizers = threading.local()
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{self.model_dir} has no fast (tokenizers) tokenizer; the engine decodes with tokenizers")
        # The output processor decodes with an instance of its own: Rust tokenizers must not be
        # shared across threads (huggingface/tokenizers#537).
        self.output_processor = OutputProcessor(Tokenizer.from_str(backend.to_str()))
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or (
            (self._tokenizer.eos_token_id,) if self._tokenizer.eos_token_id is not None else ())

        slots = num_slots(config, self.model_config, self.dtype, self.device)  # device tier: bytes -> slots
        self.workers = None  # tensor parallel: the worker processes (distributed.WorkerGroup)
        if config.tensor_parallel_size > 1:
            model = self._start_tensor_parallel(slots)
        else:
            model = load_model(self.model_dir, self.dtype, self.device, num_lora_slots=slots,
                               max_lora_rank=config.max_lora_rank, max_positions=self.max_model_len)
        try:
            num_blocks = self._num_kv_blocks(model)
            if num_blocks * config.block_size < self.max_model_len:
                raise ValueError(f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence "
                                 f"of max_model_len {self.max_model_len}; raise --num-kv-blocks or lower --max-model-len")
            slots_factory = DeviceSlots
            if self.workers is None:
                self.runner = ModelRunner(model, num_blocks, config.block_size, self.device, self.dtype, seed=config.seed,
                                          max_num_seqs=config.max_num_seqs)
            else:
                self.runner = self._tensor_parallel_runner(model, num_blocks)
                slots_factory = functools.partial(ShardedDeviceSlots, workers=self.workers)
        except BaseException:
            if self.workers is not None:
                self.workers.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.adapters = AdapterManager(config, model, self.model_config, slots_factory)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.adapter_fairness_seconds, config.tenant_scheduling),
                                   self.block_manager, self.adapters)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.last_step_seconds = 0.0

    def _start_tensor_parallel(self, slots: int):
        """Check the split, start the workers, load every rank's shard (the workers' in parallel
        with rank 0's); returns rank 0's shard of the model."""
        cfg = self.config
        check_tensor_parallel(self.model_config, cfg.tensor_parallel_size)  # before any process starts
        self.workers = WorkerGroup(cfg.tensor_parallel_size, self.device.type, cfg.tensor_parallel_timeout,
                                   logging.getLevelName(log.getEffectiveLevel()).lower()).start()
        try:
            self.workers.send(("load", LoadSpec(str(self.model_dir), str(self.dtype).removeprefix("torch."), slots,
                                                cfg.max_lora_rank, self.max_model_len, cfg.num_threads)))
            tp = TensorParallel(0, cfg.tensor_parallel_size)
            model = load_model(self.model_dir, self.dtype, self.device, num_lora_slots=slots,
                               max_lora_rank=cfg.max_lora_rank, max_positions=self.max_model_len, tp=tp)
            self.workers.collect()
            return model
        except BaseException:
            self.workers.shutdown()
            raise

    def _tensor_parallel_runner(self, model, num_blocks: int):
        cfg = self.config
        kwargs = dict(num_blocks=num_blocks, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs)
        self.workers.send(("runner", kwargs))
        runner = TPModelRunner(model, device=self.device, dtype=self.dtype, workers=self.workers, seed=cfg.seed, **kwargs)
        self.workers.collect()
        return runner

    def _num_kv_blocks(self, model) -> int:
        cfg = self.config
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, cfg.block_size, self.dtype)
        if self.device.type == "cuda":  # measured: one profiling forward at the largest step
            args = (cfg.block_size, cfg.kv_cache_memory_fraction, cfg.max_num_batched_tokens, cfg.max_num_seqs)
            if self.workers is None:
                return profile_kv_blocks(model, self.device, self.dtype, *args)
            # Every rank runs the profiling forward (it has collectives); the tightest rank decides.
            self.workers.send(("profile", dict(zip(("block_size", "memory_fraction", "max_num_batched_tokens",
                                                    "max_num_seqs"), args))))
            mine = profile_kv_blocks(model, self.device, self.dtype, *args)
            return min([mine, *self.workers.collect()])
        enough = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        return max(1, min(enough, cfg.cpu_kv_cache_bytes // per_block))

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
        """Validate and tokenize a request. Raises RequestError (a 4xx) for bad input.
        `validated_ids`: the prompt's ids from `prompt_ids`, to skip doing that again."""
        params.validate()
        ids = validated_ids if validated_ids is not None else self.prompt_ids(prompt)
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {len(ids)} prompt "
                f"tokens plus max_tokens {params.max_tokens} were requested", param="max_tokens")
        if adapter is not None:
            self.adapters.check_servable(adapter)
        return Sequence(request_id, ids, params, self.max_model_len, eos_token_ids=self.eos_token_ids, adapter=adapter)

    def add_sequence(self, seq: Sequence) -> None:
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
        """Schedule, run one forward over the mixed batch, sample, and report what changed."""
        t0 = time.perf_counter()
        self.adapters.on_step()
        outputs = self._fail_waiting_on_failed_adapters()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        try:
            results = self.runner.run(batch)
        except Exception as exc:  # a bug or device fault must not take the process down
            log.exception("forward pass failed; aborting the %d requests of this batch", len(batch))
            for item in batch:
                item.seq.error = f"internal error during generation: {exc}"
                item.seq.finish("abort")
            results = [(item, None) for item in batch]
        for item, token in results:
            if token is not None and not item.seq.is_finished:
                item.seq.append_token(token)
        self.scheduler.finish_step(batch)
        for item, token in results:
            seq = item.seq
            if token is not None or seq.is_finished:
                outputs.append(seq.take_update())
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
        self.num_steps += 1
        self.last_step_seconds = time.perf_counter() - t0
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
        """Run requests to completion (tests, benchmarks): one dict per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        results = {rid: {"token_ids": [], "text": "", "finish_reason": None, "logprobs": [], "prompt_logprobs": None, "error": None}
                   for rid in ids}
        for rid, prompt, p, a in zip(ids, prompts, params_list, adapters):
            self.add_request(rid, prompt, p, a)
        while any(results[r]["finish_reason"] is None for r in ids):
            outputs = self.step()
            if not outputs and not self.scheduler.running:
                time.sleep(0.005)  # adapters still loading off the loop
            for out in outputs:
                if out.request_id not in results:
                    continue
                r = results[out.request_id]
                r["token_ids"] += out.new_token_ids
                r["text"] += out.new_text
                r["logprobs"] += out.logprobs
                r["prompt_logprobs"] = out.prompt_logprobs or r["prompt_logprobs"]
                if out.finished:
                    r["finish_reason"], r["error"] = out.finish_reason, out.error
        return [results[r] for r in ids]

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
