"""Per-request decoding settings, validated before a request is queued."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.engine.core.errors import RequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries per request


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until the context is full
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    typical_p: float = 1.0  # LoRAX/TGI locally typical sampling; 1: off
    min_tokens: int = 0  # EOS and stop_token_ids are forbidden before this many output tokens
    # Structured output: this sequence's own GrammarMatcher (structured_output.py). Params are
    # made per sequence, so the matcher's state is the sequence's alone.
    grammar: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> "SamplingParams":
        def bad(msg: str, param: str) -> RequestError:
            return RequestError(msg, param=param)

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad(f"temperature must be between 0 and 100, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise bad(f"top_k must be -1, 0 (off) or positive, got {self.top_k}", "top_k")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}", "repetition_penalty")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise bad("seed must be a non-negative 64-bit integer", "seed")
        if len(self.stop) > 16 or any(not s for s in self.stop) or any(len(s) > 256 for s in self.stop):
            raise bad("stop takes at most 16 non-empty strings of at most 256 characters", "stop")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad(f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be between -2 and 2, got {getattr(self, name)}", name)
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
            for token, value in self.logit_bias.items():
                if not -100.0 <= value <= 100.0:
                    raise bad(f"logit_bias values must be between -100 and 100, got {value} for token {token}",
                              "logit_bias")
        if not 0.0 < self.typical_p <= 1.0:
            raise bad(f"typical_p must be in (0, 1], got {self.typical_p}", "typical_p")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        return self
