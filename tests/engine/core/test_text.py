"""Text handling: stop strings, incomplete UTF-8 at the end, and faults in one request's text.

Crafted tokenizers (bench/tiny.py `with_token_text`) make the model's first greedy token
decode to chosen bytes, so each defect is hit on purpose rather than by chance."""
import asyncio
import threading

import pytest

from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.core.conftest import PROMPTS, make_engine
from bench.tiny import with_token_text

SPECIAL_IDS = range(5)  # the tiny tokenizer's special tokens


@pytest.fixture(scope="module")
def first_token(tiny_models):
    """(prompt ids, the first greedy token) for a prompt whose first token is not special."""
    engine = make_engine(tiny_models["llama"])
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        out = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
        if out["token_ids"][0] not in SPECIAL_IDS:
            return ids, out["token_ids"][0]
    pytest.fail("every prompt's first greedy token is a special token; pick other prompts")


def crafted_engine(tiny_models, tmp_path, token_id: int, raw: bytes):
    return make_engine(str(with_token_text(tiny_models["llama"], tmp_path / "crafted", token_id, raw)))


def test_a_stop_string_inside_a_long_whitespace_token_is_found(tiny_models, tmp_path, first_token):
    ids, token = first_token
    engine = crafted_engine(tiny_models, tmp_path, token, b"\n" + b" " * 20)
    out = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=["\n"]))[0]
    assert (out["finish_reason"], out["text"]) == ("stop", ""), out
    assert out["token_ids"] == [token]
    kept = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=["\n"],
                                                 include_stop_str_in_output=True))[0]
    assert (kept["finish_reason"], kept["text"]) == ("stop", "\n"), kept


def test_trailing_incomplete_utf8_is_kept_at_the_end(tiny_models, tmp_path, first_token):
    ids, token = first_token
    engine = crafted_engine(tiny_models, tmp_path, token, b"\xf0")  # the lead byte of a 4-byte character
    out = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    assert out["token_ids"] == [token] and out["finish_reason"] == "length"
    assert out["text"] == "\ufffd" == engine.tokenizer.decode([token])
    # And mid-sequence the byte turns into the replacement character once the next token shows
    # it cannot complete: the streamed text equals decoding all the tokens at once.
    out = engine.generate([ids], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out["text"] == engine.tokenizer.decode(out["token_ids"], skip_special_tokens=True)


def test_streamed_text_equals_the_full_decode(tiny_models):
    engine = make_engine(tiny_models["qwen2"])
    params = [SamplingParams(max_tokens=40, temperature=1.5, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    for out in engine.generate(PROMPTS, params):
        assert out["text"] == engine.tokenizer.decode(out["token_ids"], skip_special_tokens=True)


async def _collect(engine, seq) -> dict:
    result = {"token_ids": [], "text": "", "finish_reason": None, "error": None}
    async for out in engine.stream(seq):
        result["token_ids"] += out.new_token_ids
        result["text"] += out.new_text
        if out.finished:
            result["finish_reason"], result["error"] = out.finish_reason, out.error
    return result


def test_a_fault_in_one_requests_text_handling_fails_that_request_alone(tiny_models, monkeypatch):
    from loraplex.engine.core import detokenizer
    from loraplex.engine.core.async_engine import AsyncEngine

    engine = make_engine(tiny_models["llama"])
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = engine.generate(PROMPTS, greedy)
    victim = engine.tokenizer.encode(PROMPTS[3])

    # Inject the fault: the victim's detokenizer raises on its third token. Record which threads
    # decode: text handling belongs to the output thread, never the step loop.
    real_init, real_add = detokenizer.IncrementalDetokenizer.__init__, detokenizer.IncrementalDetokenizer.add
    decoding_threads = set()

    def init(self, tokenizer, prompt_ids, *args, **kwargs):
        real_init(self, tokenizer, prompt_ids, *args, **kwargs)
        self.poisoned, self.seen = list(prompt_ids) == victim, 0

    def add(self, token_id):
        decoding_threads.add(threading.current_thread().name)
        self.seen += 1
        if self.poisoned and self.seen == 3:
            raise RuntimeError("injected detokenizer fault")
        return real_add(self, token_id)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add", add)

    async def run():
        served = AsyncEngine(engine).start()
        try:
            seqs = [served.make_sequence(p, greedy, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
            results = await asyncio.wait_for(asyncio.gather(*(_collect(served, s) for s in seqs)), 120)
            after = await asyncio.wait_for(_collect(served, served.make_sequence(PROMPTS[0], greedy)), 60)
            return results, after
        finally:
            served.shutdown()

    results, after = asyncio.run(run())
    for i, (got, want) in enumerate(zip(results, expected)):
        if i == 3:
            assert got["finish_reason"] == "abort" and "injected detokenizer fault" in got["error"], got
        else:
            assert got["error"] is None and got["finish_reason"] == "length", (i, got)
            assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"]), i
    assert after["token_ids"] == expected[0]["token_ids"]
    assert decoding_threads == {"engine-output"}, decoding_threads
    assert not engine.requests and engine.block_manager.num_free == engine.block_manager.num_blocks
