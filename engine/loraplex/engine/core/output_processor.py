"""The text side of every request, kept off the step loop (in the spirit of vLLM v1's output
processor): detokenization, stop strings, and the deltas streamed to clients.

The step loop hands over one `CoreOutput` per changed sequence, once per step, in one batch
(`process`). This module owns a tokenizer instance of its own (`tokenizers.Tokenizer`, decoding
in Rust), so it never shares one with the threads that encode prompts.

Where a request's text-side logic lives, for whoever extends it:
- `RequestState.add_tokens` appends each token's text, then looks for stop strings. All finish
  reasons decided here go through `RequestState.finish`.
- A request finished here (a stop string, a fault) is reported in
  `StepResult.finished_early`: the caller must abort it in the engine so it stops generating.
  Tokens the engine produced after that are ignored.

A fault in one request's text handling (a tokenizer error) ends that request with an error; the
others in the batch go on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from loraplex.engine.core.detokenizer import IncrementalDetokenizer
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import CoreOutput, RequestOutput, Sequence, TokenLogprob

log = logging.getLogger("loraplex.engine")


class RequestState:
    """One request's text: what was decoded, what was streamed, and whether it ended here."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer):
        self.request_id = seq.request_id
        self.params: SamplingParams = seq.params
        self.prompt_tokens = seq.num_prompt_tokens
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_ids)
        self.token_ids: list[int] = []  # accepted output tokens (none after a text-side finish)
        self.output_text = ""
        self.emitted_text_len = 0  # how much of output_text was streamed out already
        self.longest_stop = max((len(s) for s in self.params.stop), default=0)
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.error_code: str | None = None

    def finish(self, reason: str, stop_reason: str | int | None = None, error: str | None = None,
               error_code: str | None = None) -> None:
        if not self.finished:
            self.finished, self.finish_reason, self.stop_reason, self.error = True, reason, stop_reason, error
            self.error_code = error_code

    def add_tokens(self, token_ids: list[int], engine_stop: bool) -> int:
        """Append tokens' text, check stop strings. Returns how many were taken
        (fewer when the request ends on the text side part-way). With `engine_stop`, the last
        token is the EOS or stop token that ended the sequence: counted, but no text."""
        for k, token_id in enumerate(token_ids):
            self.token_ids.append(token_id)
            if engine_stop and k == len(token_ids) - 1:
                return k + 1
            before = len(self.output_text)
            self.output_text += self.detokenizer.add(token_id)
            if self._after_text(before):
                return k + 1
        return len(token_ids)

    def flush(self) -> None:
        """The sequence ended: add the text of a trailing partial character, then a last check."""
        before = len(self.output_text)
        self.output_text += self.detokenizer.flush()
        if len(self.output_text) > before:
            self._after_text(before)

    def _after_text(self, before: int) -> bool:
        # As vLLM: stop strings do not count before min_tokens (EOS and stop ids are masked then).
        return bool(self.params.stop) and len(self.token_ids) >= self.params.min_tokens and self._find_stop(before)

    def _find_stop(self, before: int) -> bool:
        """Search all the text added since `before`, plus the tail a match could start in."""
        start = max(0, before - (self.longest_stop - 1))
        best: tuple[int, str] | None = None
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

    def take_output(self, new_ids: list[int], logprobs: list[TokenLogprob],
                    prompt_logprobs: list[float | None] | None) -> RequestOutput:
        """The delta since the last output. While running, text that could still become a stop
        string is held back, so that a stream never shows text the final answer drops."""
        text_end = len(self.output_text)
        if not self.finished and self.longest_stop:
            text_end = max(self.emitted_text_len, text_end - (self.longest_stop - 1))
        new_text = self.output_text[self.emitted_text_len:text_end]
        self.emitted_text_len = text_end
        return RequestOutput(
            request_id=self.request_id, new_token_ids=new_ids, new_text=new_text,
            finished=self.finished, finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, error=self.error, stop_reason=self.stop_reason,
            error_code=self.error_code,
        )

    def update(self, core: CoreOutput) -> RequestOutput:
        taken = self.add_tokens(core.new_token_ids, engine_stop=core.finished and core.finish_reason == "stop")
        if core.finished and not self.finished:
            self.flush()
            self.finish(core.finish_reason, core.stop_reason, core.error, core.error_code)
        return self.take_output(core.new_token_ids[:taken], core.logprobs[:taken], core.prompt_logprobs)


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    finished_early: list[str] = field(default_factory=list)  # ended here: abort them in the engine


class OutputProcessor:
    """Turns the step loop's token batches into RequestOutputs. Single-threaded: one thread
    calls add_request, process and drop (the AsyncEngine's output thread, or LLMEngine.step)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = RequestState(seq, self.tokenizer)

    def drop(self, request_id: str) -> None:
        """Forget a request that never reached the engine (refused when queued)."""
        self.requests.pop(request_id, None)

    def process(self, batch: list[CoreOutput]) -> StepResult:
        result = StepResult()
        for core in batch:
            state = self.requests.get(core.request_id)
            if state is None:  # ended here already (its engine abort is still on its way), or unknown
                continue
            try:
                out = state.update(core)
            except Exception as exc:  # this request's text failed: end it alone, with the reason
                log.exception("text handling failed for request %s; aborting it", core.request_id)
                state.finish("abort", error=f"internal error in text handling: {exc}")
                out = state.take_output(core.new_token_ids, core.logprobs, core.prompt_logprobs)
            if out.finished:
                del self.requests[core.request_id]
                if not core.finished:
                    result.finished_early.append(core.request_id)
            result.outputs.append(out)
        return result
