"""Logits processors (penalties, logit_bias, min_tokens, grammar masks) against references, per
row of mixed batches; grammar-constrained generation on a random model validates its schema."""
import json

import jsonschema
import pytest
import torch

from loraplex.engine.core.logits_processors import apply_logits_processors
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.grammar_compiler import GrammarCompiler
from loraplex.engine.core.structured_output import GrammarError, GrammarSpec
from tests.engine.core.conftest import PROMPTS, make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_models):
    return make_engine(tiny_models["llama"])


@pytest.fixture(scope="module")
def compiler(engine):
    return GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)


def _seq(engine, i, output, **params):
    seq = engine.make_sequence(f"r{i}", PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=64, **params))
    seq.output_ids = list(output)
    return seq


def test_penalties_and_logit_bias_match_the_openai_formula_per_row(engine):
    torch.manual_seed(0)
    vocab = engine.model_config.vocab_size
    settings = [dict(), dict(presence_penalty=0.7), dict(frequency_penalty=-0.4, presence_penalty=1.5),
                dict(logit_bias={5: 3.0, 17: -100.0}), dict(frequency_penalty=2.0, logit_bias={5: -1.0})]
    outputs = [[5, 5, 9], [5, 5, 9, 9, 9, 100], [1, 2, 2, 3, 3, 3], [7], [5, 5, 5, 17]]
    seqs = [_seq(engine, i, out, **kw) for i, (out, kw) in enumerate(zip(outputs, settings))]
    logits = torch.randn(len(seqs), vocab)
    expected = logits.clone()
    for row, (seq, kw) in enumerate(zip(seqs, settings)):
        # https://platform.openai.com/docs/advanced-usage: mu[j] - c[j]*freq - (c[j] > 0)*pres + bias[j]
        for token in set(seq.output_ids):
            c = seq.output_ids.count(token)
            expected[row, token] -= c * kw.get("frequency_penalty", 0.0) + kw.get("presence_penalty", 0.0)
        for token, bias in kw.get("logit_bias", {}).items():
            expected[row, token] += bias
    apply_logits_processors(logits, seqs)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_logit_bias_matches_transformers_sequence_bias(engine):
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    bias = {3: 4.5, 40: -7.25, 100: 100.0}
    seq = _seq(engine, 0, [1, 2], logit_bias=bias)
    logits = torch.randn(1, engine.model_config.vocab_size)
    ref = SequenceBiasLogitsProcessor({(t,): v for t, v in bias.items()})(torch.tensor([seq.token_ids()]), logits.clone())
    apply_logits_processors(logits, [seq])
    assert torch.allclose(logits, ref)


def test_min_tokens_matches_transformers_and_leaves_other_rows(engine):
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    eos = list(engine.eos_token_ids)
    short = _seq(engine, 0, [1, 2], min_tokens=4, stop_token_ids=[9])
    done = _seq(engine, 1, [1, 2, 3, 4], min_tokens=4)
    plain = _seq(engine, 2, [1])
    logits = torch.randn(3, engine.model_config.vocab_size)
    before = logits.clone()
    apply_logits_processors(logits, [short, done, plain])
    ref = MinNewTokensLengthLogitsProcessor(short.num_prompt_tokens, 4, eos + [9])(
        torch.tensor([short.token_ids()]), before[:1].clone())
    assert torch.equal(logits[0], ref[0])
    assert torch.equal(logits[1:], before[1:])


def test_grammar_mask_allows_exactly_what_the_matcher_allows(engine, compiler):
    """Row 1 (a grammar, mid-output) keeps only tokens llguidance accepts next; rows 0 and 2 keep
    everything."""
    import llguidance

    spec = GrammarSpec.json_schema(SCHEMA)
    prefix = engine.tokenizer.encode('{"n": 12', add_special_tokens=False)
    seqs = [_seq(engine, 0, [4]), _seq(engine, 1, prefix, grammar=compiler.compile(spec).matcher()), _seq(engine, 2, [])]
    vocab = engine.model_config.vocab_size
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_logits_processors(logits, seqs)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    reference = llguidance.LLMatcher(compiler._ll_tokenizer(), spec.grammar())
    assert reference.consume_tokens(prefix)
    allowed = {t for t in range(vocab) if reference.validate_tokens([t]) == 1}
    assert set(torch.isfinite(logits[1]).nonzero().flatten().tolist()) == allowed
    assert allowed and len(allowed) < vocab


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_constrained_outputs_validate_in_mixed_batches(engine, compiler, temperature):
    """A random-weight model cannot write JSON; with the grammar every row's output validates,
    for several seeds, with unconstrained rows (and other grammars) in the same steps."""
    schema_rows = [SamplingParams(max_tokens=200, temperature=temperature, seed=s,
                                  grammar=compiler.compile(GrammarSpec.json_schema(SCHEMA)).matcher())
                   for s in range(4)]
    choice = SamplingParams(max_tokens=20, temperature=temperature, seed=7,
                            grammar=compiler.compile(GrammarSpec.choice(["yes", "no", "maybe"])).matcher())
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(2)]
    params = [free[0], *schema_rows[:2], choice, free[1], *schema_rows[2:]]
    results = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params)
    for p, r in zip(params, results):
        if p in schema_rows:
            assert r["finish_reason"] == "stop", r
            jsonschema.validate(json.loads(r["text"]), SCHEMA)
    assert results[3]["text"] in ("yes", "no", "maybe")
    assert len(results[0]["token_ids"]) == 12


def test_compiles_are_cached_and_bad_grammars_give_the_reason(compiler):
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    compiler.compile(spec)
    n = compiler.compiles
    compiler.compile(GrammarSpec.json_schema({"properties": {"x": {"type": "integer"}}, "type": "object"}))
    assert compiler.compiles == n  # same schema, other key order: the cache hits
    with pytest.raises(GrammarError, match="strnig"):
        compiler.compile(GrammarSpec.json_schema({"type": "strnig"}))
    with pytest.raises(GrammarError, match="unclosed group"):
        compiler.compile(GrammarSpec("regex", "a(b"))
    with pytest.raises(GrammarError, match="does not exist"):
        compiler.compile(GrammarSpec.json_schema({"$ref": "#/defs/nope"}))


def test_sampling_params_refuse_out_of_range_values():
    from loraplex.engine.core.errors import RequestError

    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(logit_bias={1: 101.0}),
                dict(min_tokens=-1), dict(min_tokens=20, max_tokens=10)):
        with pytest.raises(RequestError):
            SamplingParams(**bad).validate()


def test_a_failing_matcher_ends_only_its_own_row(engine, compiler):
    """A matcher that raises (or errs) allows only EOS in its row; the other rows are untouched."""
    broken = compiler.compile(GrammarSpec.json_schema(SCHEMA)).matcher()

    class Boom:
        def consume_token(self, token):
            raise RuntimeError("boom")

    broken._m = Boom()
    seqs = [_seq(engine, 0, [5], grammar=broken), _seq(engine, 1, [5])]
    logits = torch.randn(2, engine.model_config.vocab_size)
    before = logits.clone()
    apply_logits_processors(logits, seqs)
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(engine.eos_token_ids)
    assert torch.equal(logits[1], before[1])


def test_typical_p_matches_transformers_per_row(engine):
    from transformers.generation.logits_process import TypicalLogitsWarper

    from loraplex.engine.core.logits_processors import apply_typical_p

    masses = [0.3, 1.0, 0.9, 0.05]
    seqs = [_seq(engine, i, [], typical_p=m, temperature=1.0) for i, m in enumerate(masses)]
    torch.manual_seed(3)
    scaled = torch.randn(len(seqs), engine.model_config.vocab_size) * 3
    out = apply_typical_p(scaled, seqs)
    for row, mass in enumerate(masses):
        ref = scaled[row:row + 1] if mass == 1.0 else TypicalLogitsWarper(mass)(None, scaled[row:row + 1].clone())
        assert torch.equal(out[row], ref[0]), row
    assert torch.isinf(out[0]).sum() > torch.isinf(out[2]).sum() > 0


def test_constrained_rows_survive_preemption(tiny_models):
    """A KV cache too small for the batch preempts rows; their matchers keep their place (they
    follow the sequence's output, not the steps), so the outputs still validate."""
    small = make_engine(tiny_models["llama"], num_kv_blocks=16, max_num_seqs=6, max_model_len=256)
    compiler = GrammarCompiler(small.tokenizer, small.model_config.vocab_size, small.eos_token_ids)
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    params = [SamplingParams(max_tokens=150, temperature=1.0, seed=s, grammar=grammar.matcher()) for s in range(6)]
    results = small.generate([PROMPTS[i % len(PROMPTS)] for i in range(6)], params)
    assert small.scheduler.num_preemptions > 0
    for r in results:
        assert r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["text"]), SCHEMA)
