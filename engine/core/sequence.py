"""A request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from loraplex.engine.core.detokenizer import IncrementalDetokenizer
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


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_model_len: int,
                 tokenizer, eos_token_ids: tuple[int, ...], adapter: str | None = None):
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
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        # Stop once prompt + output fills the context, even without max_tokens.
        room = max_model_len - len(prompt_ids)
        self.max_output = min(params.max_tokens, room) if params.max_tokens is not None else room
        # A seeded request owns its generator, so its draws do not depend on the batch.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.output_text = ""
        self.emitted_text_len = 0  # how much of output_text was streamed out already
        self.emitted_token_count = 0
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[float | None] | None = [None] if params.prompt_logprobs else None
        self.prompt_logprobs_sent = False

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

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and decide whether the sequence is done."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids or token_id in self.params.stop_token_ids:
            self.finish("stop", token_id if token_id in self.params.stop_token_ids else None)
            return
        self.output_text += self.detokenizer.add(token_id)
        if self.params.stop and self._truncate_at_stop_string():
            return
        if len(self.output_ids) >= self.max_output:
            self.finish("length")

    def _truncate_at_stop_string(self) -> bool:
        # Only the tail can hold a new match: the new text plus a stop string's length back.
        window = max(len(s) for s in self.params.stop) + 16
        start = max(0, len(self.output_text) - window)
        best = None
        for s in self.params.stop:
            i = self.output_text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.output_text = self.output_text[: i + len(s)] if self.params.include_stop_str_in_output else self.output_text[:i]
        self.finish("stop", s)
        return True

    def take_output(self) -> RequestOutput:
        """The delta since the last call. While running, text that could still become a stop
        string is held back so that a stream never shows text the final answer drops."""
        text_end = len(self.output_text)
        if not self.is_finished and self.params.stop:
            text_end = max(self.emitted_text_len, text_end - (max(len(s) for s in self.params.stop) - 1))
        new_text = self.output_text[self.emitted_text_len:text_end]
        self.emitted_text_len = text_end
        new_ids = self.output_ids[self.emitted_token_count:]
        self.emitted_token_count = len(self.output_ids)
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        prompt_lp = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and len(self.prompt_logprobs) >= self.num_prompt_tokens:
            prompt_lp, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return RequestOutput(
            request_id=self.request_id, new_token_ids=new_ids, new_text=new_text,
            finished=self.is_finished, finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens, completion_tokens=len(self.output_ids),
            logprobs=logprobs, prompt_logprobs=prompt_lp, error=self.error, stop_reason=self.stop_reason,
        )
