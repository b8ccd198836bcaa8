"""The `openai` package against the real server: completions and chat, streamed and not."""
from __future__ import annotations

import openai
import pytest

from tests.engine.api.conftest import ADMIN_TOKEN

PROMPT = "Paris is the capital of"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=60)


def test_models_list_base_and_adapters(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert {"tiny-base", "a1", "a2", "a3", "private-a"} <= set(models)
    for name in ("a1", "a2", "a3", "private-a"):
        assert models[name].model_extra["parent"] == "tiny-base"
    assert models["tiny-base"].model_extra["parent"] is None


def test_completion_logprobs_and_n(oai, tokenizer):
    resp = oai.completions.create(model="a2", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, n=2,
                                  extra_body={"ignore_eos": True})
    assert len(resp.choices) == 2
    assert sorted(c.index for c in resp.choices) == [0, 1]
    # greedy: both choices are the same sequence
    assert resp.choices[0].text == resp.choices[1].text
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert resp.usage.prompt_tokens == prompt_tokens
    assert resp.usage.completion_tokens == 12
    for c in resp.choices:
        assert c.finish_reason == "length"
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)


def test_completion_stream_matches_and_reports_usage(oai):
    full = oai.completions.create(model="a3", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(model="a3", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6 == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(oai):
    chunks = list(oai.completions.create(model="tiny-base", prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert chunks and all(c.choices for c in chunks)


def test_chat_completion_and_stream(oai, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Where is Paris?"}]
    resp = oai.chat.completions.create(model="a1", messages=messages, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert resp.usage.completion_tokens == 5
    content = choice.logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)

    stream = oai.chat.completions.create(model="a1", messages=messages, max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 5


def test_chat_n2_streamed(oai):
    stream = oai.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}], n=2,
                                         max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finished = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1]


def test_stop_string_truncates(oai):
    base = oai.completions.create(model="a2", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    # a stop string from the middle of the greedy answer, free of replacement characters
    candidates = [base[i:i + 2] for i in range(1, len(base) - 1) if "\ufffd" not in base[i:i + 2]]
    assert candidates, f"no usable stop string in {base!r}"
    stop = candidates[len(candidates) // 2]
    resp = oai.completions.create(model="a2", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert resp.choices[0].text == base[:base.find(stop)]
    assert resp.choices[0].finish_reason == "stop"
    resp2 = oai.completions.create(model="a2", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                   extra_body={"ignore_eos": True})
    assert resp2.choices[0].text == resp.choices[0].text


def test_seed_reproduces_sampling(oai):
    kw = dict(model="a3", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.95, seed=1234,
              extra_body={"ignore_eos": True})
    first = oai.completions.create(**kw).choices[0].text
    second = oai.completions.create(**kw).choices[0].text
    assert first == second


def test_adapters_change_the_answer(oai):
    answers = {m: oai.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
               for m in ("tiny-base", "a1", "a2", "a3")}
    assert len(set(answers.values())) >= 3, answers


def test_errors_surface_as_openai_exceptions(oai, server):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="a1", prompt=PROMPT, max_tokens=2, temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # the admin token works on inference routes too
    admin = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN_TOKEN, max_retries=0)
    assert "private-a" in {m.id for m in admin.models.list().data}


def test_batch_and_token_id_prompts(oai, tokenizer):
    prompts = ["The quick brown fox", "Paris is"]
    single = [oai.completions.create(model="a1", prompt=p, max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    batch = oai.completions.create(model="a1", prompt=prompts, max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == single
    assert batch.usage.completion_tokens == 8
    ids = oai.completions.create(model="a1", prompt=tokenizer.encode(prompts[1]), max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert ids.choices[0].text == single[1]
