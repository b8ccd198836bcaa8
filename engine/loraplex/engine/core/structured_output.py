"""Structured output: grammars compiled by llguidance, one matcher per sequence.

A `GrammarSpec` says what the output must be (a JSON schema, any JSON object, a regex, one of
several strings, a Lark grammar). `GrammarCompiler` (grammar_compiler.py) compiles it once, with
its first token mask, within llguidance's limits, a time-out and a byte budget, before the
request is queued; a spec that does not compile raises `GrammarError` (a 400) with the reason.
`CompiledGrammar.matcher()` hands out a fresh `GrammarMatcher` per sequence; the copies share
the lexer the first mask built, so the step thread's masks start warm.

On the step thread, `GrammarMatcher.fill` first consumes the tokens the sequence sampled since
the last step, then writes the allowed-token bitmask of the next one (see logits_processors.py).

Why llguidance (not xgrammar or outlines-core): it has no dependencies (xgrammar pulls torch and
triton without pins), and on SmolLM2's 49k vocabulary it measured 0.07 ms per token for a
JSON schema against xgrammar's 0.14 ms (one core, this machine), with ~1 ms compiles.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch

from loraplex.engine.core.errors import RequestError

log = logging.getLogger("loraplex.engine")

# Compact JSON (", " / ": " separators, no free whitespace): the output is what json.dumps writes,
# and a model cannot pad it with whitespace forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(RequestError):
    code = "invalid_grammar"


class GrammarTooComplexError(GrammarError):
    """The grammar compiles but hits llguidance's limits, or its first mask is not ready in time."""

    code = "grammar_too_complex"


class GrammarBusyError(GrammarError):
    """No compile worker, or no room in the grammar memory budget, within the time-out: retry."""

    status = 503
    code = "grammar_busy"
    retry_after = 1


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. `value`: the schema (JSON text), regex, Lark text, or the
    choices as a JSON list; empty for json_object."""

    kind: str  # json_schema | json_object | regex | choice | lark
    value: str = ""
    param: str | None = None  # the request field it came from, for error messages

    @classmethod
    def json_schema(cls, schema, param: str | None = None) -> "GrammarSpec":
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the JSON schema must be an object", param=param)
        return cls("json_schema", json.dumps(schema, sort_keys=True), param)

    @classmethod
    def choice(cls, choices: list[str], param: str | None = None) -> "GrammarSpec":
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("choice needs a non-empty list of strings", param=param)
        return cls("choice", json.dumps(list(choices)), param)

    @property
    def key(self) -> str:
        """What the spec asks for, as a short digest (the field it came from is not part of it)."""
        return hashlib.sha256(f"{self.kind}\0{self.value}".encode()).hexdigest()

    def grammar(self) -> str:
        """The llguidance grammar text."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            # A Lark alternation of string literals (JSON string syntax is Lark's too).
            alternatives = " | ".join(json.dumps(c) for c in json.loads(self.value))
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.value)
        raise GrammarError(f"unknown grammar kind {self.kind!r}", param=self.param)


class GrammarMatcher:
    """One sequence's position in its grammar. Used only by the step thread once queued."""

    def __init__(self, matcher, eos_token_ids: tuple[int, ...], owner: "CompiledGrammar | None" = None):
        self._m = matcher
        self._eos = eos_token_ids
        self._owner = owner  # keeps the grammar (and its place in the memory budget) alive while this runs
        self.consumed = 0  # output tokens fed to the matcher so far

    def fill(self, output_ids: list[int], bitmask: torch.Tensor, row: int) -> None:
        """Catch up with the sampled tokens, then write the allowed next tokens into bitmask[row]
        (int32 words, bit t of the row = token t allowed). A matcher in error (a token it did not
        allow, which the mask should prevent) allows only EOS, so the sequence ends."""
        try:
            for token in output_ids[self.consumed:]:
                self._m.consume_token(token)
            self.consumed = len(output_ids)
            if not self._m.is_error():
                v = bitmask[row]
                self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
                if not self._m.is_error():
                    return
        except Exception:  # noqa: BLE001 - one row's grammar must never fail the whole batch
            log.exception("grammar matcher failed; ending its sequence")
        bitmask[row] = 0
        for t in self._eos:
            bit = 1 << (t % 32)
            bitmask[row, t // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words are signed


class CompiledGrammar:
    """One compiled grammar (the matcher template at the grammar's start, its first mask computed)
    and the bytes it is charged in the compiler's budget. Each sequence's matcher keeps it alive:
    the lexer its copies share is freed only once the cache and every sequence let go of it."""

    def __init__(self, matcher, eos_token_ids: tuple[int, ...], text: str = "", nbytes: int = 0):
        self._template = matcher
        self._eos = eos_token_ids
        self.text = text
        self.nbytes = nbytes

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start (a cheap copy), one per sequence."""
        return GrammarMatcher(self._template.deep_copy(), self._eos, owner=self)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, vocab_size] bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
