"""Structured output for the HTTP layer: which grammar a request asks for, compiled (first token
mask included) on the compiler's worker threads before anything is queued, so neither the event
loop nor the step loop waits on it; bounded by --grammar-timeout, --grammar-workers and
--grammar-cache-bytes (core/grammar_compiler.py).

Sources, at most one per request:
- OpenAI `response_format`: `json_object` (any JSON object) or `json_schema` (`strict` or not,
  the schema is enforced);
- vLLM `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark);
- LoRAX `parameters.response_format` (`{"type": "json_object", "schema": ...}`);
- `tool_choice` `required` or a named function (tools.py builds that schema).
"""
from __future__ import annotations

import copy
import json

from loraplex.engine.api.errors import APIError
from loraplex.engine.core.grammar_compiler import GrammarCompiler
from loraplex.engine.core.structured_output import CompiledGrammar, GrammarError, GrammarSpec


def compiler_for(state) -> GrammarCompiler:
    """The server's grammar compiler (one per engine: it holds the tokenizer's token trie)."""
    engine = state.require_engine()
    owner, compiler = getattr(state, "grammar_compiler", (None, None))
    if owner is not engine:
        # A copy of its own: the compiler reads it on worker threads (Rust tokenizers must not be
        # shared across threads, huggingface/tokenizers#537).
        settings = state.settings
        compiler = GrammarCompiler(copy.deepcopy(engine.tokenizer), engine.vocab_size,
                                   engine.eos_token_ids, cache_bytes=settings.grammar_cache_bytes,
                                   workers=settings.grammar_workers)
        if owner is not None:
            state.grammar_compiler[1].shutdown()
        state.grammar_compiler = (engine, compiler)
    return compiler


async def compile_grammar(state, spec: GrammarSpec | None) -> CompiledGrammar | None:
    """Compile spec off the event loop within --grammar-timeout; a GrammarError becomes its 4xx
    (400 invalid_grammar or grammar_too_complex, 503 grammar_busy) naming the field at fault."""
    if spec is None:
        return None
    compiler = compiler_for(state)
    try:
        return await compiler.compile_within(spec, state.settings.grammar_timeout_seconds)
    except GrammarError as exc:
        raise APIError.from_request_error(exc) from None


def _one(specs: list[GrammarSpec]) -> GrammarSpec | None:
    if len(specs) > 1:
        raise APIError(400, "ask for one kind of structured output at a time: "
                       + ", ".join(s.param or s.kind for s in specs), param=specs[1].param)
    return specs[0] if specs else None


def openai_spec(body) -> GrammarSpec | None:
    """The grammar of an OpenAI completions or chat body (response_format, guided_*)."""
    specs: list[GrammarSpec] = []
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        specs.append(GrammarSpec("json_object", param="response_format"))
    elif rf is not None and rf.type == "json_schema":
        specs.append(GrammarSpec.json_schema(rf.json_schema.schema_, param="response_format.json_schema.schema"))
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise APIError(400, f"guided_json is not valid JSON: {exc}", param="guided_json") from None
        specs.append(GrammarSpec.json_schema(schema, param="guided_json"))
    if body.guided_regex is not None:
        specs.append(GrammarSpec("regex", body.guided_regex, param="guided_regex"))
    if body.guided_choice is not None:
        specs.append(GrammarSpec.choice(body.guided_choice, param="guided_choice"))
    if body.guided_grammar is not None:
        specs.append(GrammarSpec("lark", body.guided_grammar, param="guided_grammar"))
    return _one(specs)


def lorax_spec(response_format) -> GrammarSpec | None:
    if response_format is None:
        return None
    if response_format.schema_ is None:
        return GrammarSpec("json_object", param="parameters.response_format")
    return GrammarSpec.json_schema(response_format.schema_, param="parameters.response_format.schema")
