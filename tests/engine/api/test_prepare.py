"""Request preparation (lifecycle.make_sequences): each prompt is tokenized and validated once,
however many choices (`n`) share it; the choices still get their own sequences and params."""
from loraplex.engine.api.lifecycle import make_sequences
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.core.conftest import make_engine


def test_n_choices_tokenize_each_prompt_once(tiny_models, monkeypatch):
    engine = make_engine(tiny_models["llama"])
    calls = []
    real = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda prompt: calls.append(prompt) or real(prompt))
    served = AsyncEngine(engine)  # not started: preparation needs no step loop
    prompts = ["The quick brown fox", "Paris is the capital of France."]
    seqs = make_sequences(served, "req", prompts, 4, lambda i: SamplingParams(max_tokens=3, seed=i), None)
    assert calls == prompts
    assert [s.request_id for s in seqs] == [f"req-{i}" for i in range(8)]
    assert [s.params.seed for s in seqs] == [0, 1, 2, 3] * 2
    assert [s.prompt_ids for s in seqs] == [real(prompts[0])] * 4 + [real(prompts[1])] * 4
