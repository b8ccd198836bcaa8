"""The grammar compiler's bounds (issue 20, finding 1): the first mask is computed by the compile
(off the step thread), a lexer past llguidance's limits is refused, and compiled grammars are
kept within a byte budget that also counts the grammars running sequences still hold."""
from __future__ import annotations

import asyncio
import gc
import time

import pytest
import torch

from loraplex.engine.core import grammar_compiler
from loraplex.engine.core.grammar_compiler import GrammarCompiler
from loraplex.engine.core.structured_output import GrammarBusyError, GrammarSpec, GrammarTooComplexError
from bench.tiny import tiny_tokenizer

MiB = 1 << 20


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make(tokenizer, **kw) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,), **kw)


def bomb(i: int) -> GrammarSpec:
    return GrammarSpec("regex", f"a{{1000}}{{{1000 + i}}}")


def first_fill(matcher, vocab: int) -> None:
    matcher.fill([], torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32), 0)


def test_the_compile_builds_the_lexer_so_the_step_threads_first_mask_costs_nothing(tokenizer):
    if grammar_compiler._heap_bytes is None:
        pytest.skip("this C library has no mallinfo2: the heap cannot be measured")
    c = make(tokenizer)
    compiled = c.compile(bomb(0))
    assert compiled.nbytes > 5 * MiB, compiled.nbytes  # the lexer the first mask built, measured
    matcher = compiled.matcher()
    before = grammar_compiler._heap_bytes()
    first_fill(matcher, len(tokenizer))
    grown = grammar_compiler._heap_bytes() - before
    print(f"bomb charged {compiled.nbytes / MiB:.1f} MiB; the step thread's first mask grew the heap {grown / MiB:.2f} MiB")
    assert grown < 2 * MiB  # before: ~200 MiB and 1.3-1.7 s, on the step thread


def test_the_cache_is_bounded_in_bytes_not_entries(tokenizer):
    c = make(tokenizer, cache_bytes=64 * MiB)
    small = [c.compile(GrammarSpec("regex", f"[a-f]{{{i + 1}}}")) for i in range(40)]
    assert len(c._cache) == 40 and c.cached_bytes <= 64 * MiB  # small grammars: many fit
    del small
    charges = [c.compile(bomb(i)).nbytes for i in range(4)]
    print(f"bomb charges (MiB): {[round(x / MiB, 1) for x in charges]}; cache {c.cached_bytes / MiB:.1f} MiB "
          f"in {len(c._cache)} grammars")
    assert c.live_bytes <= 64 * MiB or len(c._cache) == 1
    assert c.compiles == 44


def test_grammars_held_by_sequences_count_and_fill_the_budget(tokenizer):
    c = make(tokenizer, cache_bytes=4 * MiB)  # smaller than one bomb
    held = c.compile(bomb(0)).matcher()  # a running sequence's matcher
    c.compile(bomb(1))  # evicts bomb 0 from the cache; the sequence still holds its lexer
    assert c.live_bytes - c.cached_bytes >= 4 * MiB
    with pytest.raises(GrammarBusyError, match="memory budget"):
        c.compile(bomb(2), deadline=time.monotonic() + 0.1)
    with pytest.raises(GrammarBusyError, match="memory budget"):  # the HTTP path: 503, not "too complex"
        asyncio.run(c.compile_within(bomb(2), 0.2))
    del held  # the sequence ended
    gc.collect()
    assert c.live_bytes == c.cached_bytes
    asyncio.run(c.compile_within(bomb(2), 30))  # not refused for having waited


def test_a_grammar_past_the_limits_is_refused_at_its_first_mask_and_remembered(tokenizer):
    c = make(tokenizer, limits=dict(step_lexer_fuel=50))  # too little for this lexer's first mask
    spec = GrammarSpec("regex", "[a-z]{1,50}@[a-z]{1,50}")
    with pytest.raises(GrammarTooComplexError, match="too complex"):
        c.compile(spec)
    n = c.compiles
    with pytest.raises(GrammarTooComplexError):
        c.compile(GrammarSpec("regex", spec.value, param="other"))  # the same grammar: from memory
    assert c.compiles == n
