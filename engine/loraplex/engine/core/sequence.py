"""A request's state as it moves through the engine, and what the engine reports about it.

The step loop owns `Sequence` (token ids, KV blocks, engine-side stops: EOS, stop token ids,
length). Text (detokenization, stop strings, streamed deltas) lives in the output processor
(output_processor.py); each step hands it one `CoreOutput` per sequence that changed, and it
hands back `RequestOutput` deltas, which `RequestResult` adds up for a non-streamed answer.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from loraplex.engine.core.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """One step's news for one request. Text and tokens are deltas since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    error: str | None = None  # set when the engine aborted the request on an internal error
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error_code: str | None = None  # with `error`, when the abort has a RequestError code of its own


@dataclass
class RequestResult:
    """A request's RequestOutputs, accumulated (a non-streamed answer; `LLMEngine.generate`)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # None until the request finished
    stop_reason: str | int | None = None
    error: str | None = None
    error_code: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:  # sent once, when the prompt is fully computed
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        if out.finished:
            self.finish_reason, self.stop_reason, self.error = out.finish_reason, out.stop_reason, out.error
            self.error_code = out.error_code


@dataclass
class CoreOutput:
    """What one step did to one sequence: the step loop's hand-over to the output processor."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # engine-side only: "stop" (EOS or a stop token id) | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    error: str | None = None
    prompt_logprobs: list[float | None] | None = None  # once, when the prompt is fully computed
    error_code: str | None = None  # RequestError.code of the abort, when it has one (adapter_load_timeout)


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_model_len: int,
                 *, eos_token_ids: tuple[int, ...] = (), adapter: str | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.adapter = adapter  # adapter name, None for the base model
        self.lora_slot: int = -1  # device slot while running, -1 = no adapter
        self.lora_rank: int = 0
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []
        # Prefix caching (block_manager): the adapter's content digest, set when the adapter gets
        # a slot; the hash chain over full blocks, and how many of the table's blocks are cached.
        self.adapter_digest: str | None = None
        self.block_hashes: list[bytes] = []
        self.block_hashes_key: tuple | None = None
        self.num_cached_blocks = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.error_code: str | None = None  # a RequestError code that says why it was aborted
        self.num_preemptions = 0
        # Fair share across tenants (tenant_share.py): who is charged for this sequence's compute,
        # with what weight (the HTTP layer sets both after make_sequence), and how many prompt
        # tokens were charged already (recomputed ones, after a preemption, are not charged again).
        self.tenant = "default"
        self.tenant_weight = 1.0
        self.prompt_tokens_charged = 0
        # Timestamps (time.monotonic()) for tracing and latency metrics; None until it happens.
        self.arrival_time = time.monotonic()
        self.cached_prompt_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.first_scheduled_time: float | None = None  # first admitted into a batch
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.adapter_wait_time: float | None = None  # first skipped for its adapter still loading (wait = first_scheduled - this)
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        # Stop once prompt + output fills the context, even without max_tokens.
        room = max_model_len - len(prompt_ids)
        self.max_output = min(params.max_tokens, room) if params.max_tokens is not None else room
        # A seeded request owns its generator, so its draws do not depend on the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        # Handed over to the output processor at the end of each step (take_update).
        self.reported_token_count = 0
        self.pending_logprobs: list[TokenLogprob] = []  # the sampler appends here
        self.prompt_logprobs: list[float | None] | None = [None] if params.prompt_logprobs else None
        self.prompt_logprobs_sent = False

    @property
    def tenant_weight(self) -> float:
        return self._tenant_weight

    @tenant_weight.setter
    def tenant_weight(self, weight: float) -> None:
        # Refused where it is set, before the sequence is queued: a counter divided by zero,
        # a negative or a NaN weight would break every other tenant's order.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"tenant_weight must be a finite number > 0, not {weight!r}")
        self._tenant_weight = float(weight)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids()[start:end] without copying the whole sequence (decode steps read one token)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if self.finish_time is None:
            self.finish_time = time.monotonic()

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and apply the engine-side stops (text stops are the output processor's)."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids or token_id in self.params.stop_token_ids:
            self.finish("stop", token_id if token_id in self.params.stop_token_ids else None)
        elif len(self.output_ids) >= self.max_output:
            self.finish("length")

    def take_update(self) -> CoreOutput:
        """What changed since the last call: new tokens, their logprobs, the end if it came."""
        new_ids = self.output_ids[self.reported_token_count:]
        self.reported_token_count = len(self.output_ids)
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        prompt_lp = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and len(self.prompt_logprobs) >= self.num_prompt_tokens:
            prompt_lp, self.prompt_logprobs_sent = self.prompt_logprobs, True
        stop_token = self.stop_reason if isinstance(self.stop_reason, int) else None
        return CoreOutput(self.request_id, new_ids, logprobs, self.is_finished, self.finish_reason,
                          stop_token, self.error, prompt_lp, self.error_code)
