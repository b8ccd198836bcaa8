"""Structured output: grammars compiled by llguidance, one matcher per sequence.

A `GrammarSpec` says what the output must be (a JSON schema, any JSON object, a regex, one of
several strings, a Lark grammar). `GrammarCompiler.compile(spec)` compiles it once (cached by
the grammar text); `CompiledGrammar.matcher()` hands out a fresh `GrammarMatcher` per sequence. Compilation runs in the
caller (the HTTP layer calls it on a worker thread), before the request is queued, so a grammar
never costs the step loop more than its per-token mask; a spec that does not compile raises
`GrammarError` (a 400) with llguidance's reason.

On the step thread, `GrammarMatcher.fill` first consumes the tokens the sequence sampled since
the last step, then writes the allowed-token bitmask of the next one (see logits_processors.py).

Why llguidance (not xgrammar or outlines-core): it has no dependencies (xgrammar pulls torch and
triton without pins), and on SmolLM2's 49k vocabulary it measured 0.07 ms per token for a
JSON schema against xgrammar's 0.14 ms (one core, this machine), with ~1 ms compiles.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraplex.engine.core.errors import RequestError

log = logging.getLogger("loraplex.engine")

# Compact JSON (", " / ": " separators, no free whitespace): the output is what json.dumps writes,
# and a model cannot pad it with whitespace forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 256 * 1024


class GrammarError(RequestError):
    code = "invalid_grammar"


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

    def __init__(self, matcher, eos_token_ids: tuple[int, ...]):
        self._m = matcher
        self._eos = eos_token_ids
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


class GrammarCompiler:
    """Compiles grammars for one tokenizer and keeps the last `cache_size` of them. Thread-safe;
    the llguidance tokenizer (about 0.5 s for a 49k vocabulary) is built on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int = 256):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer = None
        self._cache: OrderedDict[str, object] = OrderedDict()  # grammar text -> compiled LLMatcher
        self.compiles = 0  # cache misses, for tests and metrics

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None)
        return self._tokenizer

    def compile(self, spec: GrammarSpec) -> "CompiledGrammar":
        """spec compiled (or from the cache). Raises GrammarError with the reason when it does not
        compile. Can take long for large schemas: call it off the event loop and the step loop."""
        from llguidance import LLMatcher

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
            tokenizer = self._ll_tokenizer()
        if compiled is None:
            compiled = LLMatcher(tokenizer, text, log_level=0)  # drops the GIL while it compiles
            if compiled.is_error():
                raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {compiled.get_error()}",
                                   param=spec.param)
            with self._lock:
                self.compiles += 1
                self._cache[text] = compiled
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return CompiledGrammar(compiled, self.eos_token_ids)


class CompiledGrammar:
    def __init__(self, matcher, eos_token_ids: tuple[int, ...]):
        self._template = matcher
        self._eos = eos_token_ids

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start (a cheap copy), one per sequence."""
        return GrammarMatcher(self._template.deep_copy(), self._eos)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, vocab_size] bool, True where the token is allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
