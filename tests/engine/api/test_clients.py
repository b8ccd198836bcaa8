"""Real clients against a real server process: the openai SDK (structured output, tools with every
tool_choice streamed and not, penalties, logit_bias, min_tokens, echo), LangChain
(with_structured_output, bind_tools) and lorax-client (response_format). The model is the tiny
random one: outputs that validate do so because the grammar engine made them."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.engine.api.clients_support import (MERGE_WEIGHTS, PERSON, TIME, WEATHER, hermes_checkpoint,
                                              merge_adapters_with_peft)
from tests.engine.api.conftest import assert_error, engine_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tools_server(assets):
    base = hermes_checkpoint(assets.base, assets.root / "hermes-base")
    merge_names = merge_adapters_with_peft(assets.base, assets.adapter_dir)
    with engine_process("tools_server", [
        "--model-id", str(base), "--served-model-name", "tiny", "--device", "cpu", "--num-kv-blocks", "512",
        "--adapter-dir", str(assets.adapter_dir), "--preload-adapters", ",".join(["a1", "a2", "a3", *merge_names]),
        "--max-active-adapters", "10", "--max-num-seqs", "32",
        "--num-threads", "1"], assets.root / "tools.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def oai(tools_server):
    from openai import OpenAI

    return OpenAI(base_url=tools_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(oai, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": "Paris is"}])
    return oai.chat.completions.create(**kw)


# ---- structured output ------------------------------------------------------------------------

def test_json_schema_outputs_validate_across_adapters_seeds_and_temperatures(oai):
    """Concurrent requests share steps: schema rows on three adapters and the base, json_object
    rows, and unconstrained rows."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    jobs = [dict(model=m, response_format=fmt, seed=s, temperature=t, max_tokens=120)
            for m in ("tiny", "a1", "a2", "a3") for s, t in ((1, 0.0), (2, 0.7), (3, 1.3))]
    jobs += [dict(model="a2", response_format={"type": "json_object"}, seed=s, temperature=1.0, max_tokens=400)
             for s in (4, 5)]
    jobs += [dict(model=m, seed=9, temperature=1.0, max_tokens=16) for m in ("tiny", "a1")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda kw: chat(oai, **kw), jobs))
    for kw, a in zip(jobs, answers):
        text = a.choices[0].message.content
        if "response_format" not in kw:
            continue
        if kw["response_format"]["type"] == "json_schema":
            assert a.choices[0].finish_reason == "stop", (kw, text)
            jsonschema.validate(json.loads(text), PERSON)
        elif a.choices[0].finish_reason == "stop":  # json_object: any object, unbounded in length
            assert isinstance(json.loads(text), dict), text


def test_sdk_parse_with_a_pydantic_model_streams_and_vllm_guided_fields(oai):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: str = Field(pattern="^(cat|dog)$")
        legs: int = Field(ge=0, le=4)

    parsed = oai.chat.completions.parse(model="a1", messages=[{"role": "user", "content": "a pet"}],
                                        response_format=Pet, seed=3, temperature=1.0, max_tokens=60)
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")

    stream = chat(oai, model="a3", stream=True, seed=1, temperature=0.9, max_tokens=120,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)

    choice = chat(oai, extra_body={"guided_choice": ["left", "right"]}, temperature=1.0, seed=2, max_tokens=10)
    assert choice.choices[0].message.content in ("left", "right")
    regex = oai.completions.create(model="tiny", prompt="id:", extra_body={"guided_regex": "[a-f0-9]{8}"},
                                   temperature=1.0, seed=4, max_tokens=20)
    assert len(regex.choices[0].text) == 8 and all(c in "abcdef0123456789" for c in regex.choices[0].text)


# ---- tools --------------------------------------------------------------------------------------

WEATHER_PARAMS = WEATHER["function"]["parameters"]


def _check_call(call, name="get_weather"):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    schema = WEATHER_PARAMS if name == "get_weather" else TIME["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def _collect_stream(stream):
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named_and_required(oai, stream):
    tools = [WEATHER, TIME]
    named = dict(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=1.0, seed=5, max_tokens=60, model="a1")
    required = dict(tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=6,
                    max_tokens=200, model="a2")
    for kw in (named, required):
        if not stream:
            a = chat(oai, **kw)
            assert a.choices[0].finish_reason == "tool_calls", (kw, a)
            calls = a.choices[0].message.tool_calls
            assert calls and a.choices[0].message.content is None
            for call in calls:
                _check_call(call, call.function.name)
            if kw is named:
                assert [c.function.name for c in calls] == ["get_weather"]
        else:
            content, calls, finish = _collect_stream(chat(oai, stream=True, **kw))
            assert finish == "tool_calls" and calls and content == ""
            for call in calls:
                assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
                json.loads(call["arguments"])


HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_parses_hermes_calls_and_none_does_not(oai, stream):
    """A random model never writes a tool call by itself: a guided regex makes it write text and
    then a Hermes call, which the auto parser must find (and `none` must leave alone)."""
    regex = "Sure[.] " + HERMES_CALL.replace("{", "[{]").replace("}", "[}]")
    kw = dict(tools=[WEATHER], extra_body={"guided_regex": regex}, temperature=0.0, max_tokens=200)
    if not stream:
        a = chat(oai, **kw)
        assert a.choices[0].finish_reason == "tool_calls"
        assert a.choices[0].message.content == "Sure."
        _check_call(a.choices[0].message.tool_calls[0])
        assert json.loads(a.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome", "unit": "c"}
        none = chat(oai, tool_choice="none", **kw)
        assert none.choices[0].message.content == "Sure. " + HERMES_CALL
        assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason == "stop"
    else:
        content, calls, finish = _collect_stream(chat(oai, stream=True, **kw))
        assert content == "Sure. " and finish == "tool_calls"
        assert len(calls) == 1 and calls[0]["name"] == "get_weather"
        assert json.loads(calls[0]["arguments"]) == {"city": "Rome", "unit": "c"}
        content, calls, finish = _collect_stream(chat(oai, stream=True, tool_choice="none", **kw))
        assert content == "Sure. " + HERMES_CALL and calls == [] and finish == "stop"


def test_tool_history_renders_through_the_template(oai, assets):
    """An assistant tool call and the tool's answer in the history reach the prompt through the
    template (the prompt grows by exactly what the template renders for them)."""
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    a = chat(oai, messages=history, tools=[WEATHER], max_tokens=1, temperature=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.root / "hermes-base")
    messages = [history[0], {**history[1], "content": "", "tool_calls": [
        {**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}}]},
        history[2]]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}</tool_call>' in text
    assert "<tool_response>21 C and sunny</tool_response>" in text and '"get_weather"' in text
    assert a.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


# ---- sampling parameters --------------------------------------------------------------------------

def test_logit_bias_min_tokens_penalties_and_echo(oai, tokenizer):
    eos = tokenizer.eos_token_id
    token = tokenizer.encode(" fox", add_special_tokens=False)[0]
    forced = oai.completions.create(model="a1", prompt="The", max_tokens=5, temperature=1.0, seed=1,
                                    logit_bias={str(token): 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([token])] * 5
    # EOS is forced by the bias, but not before min_tokens
    early = oai.completions.create(model="tiny", prompt="The", max_tokens=20, temperature=0,
                                   logit_bias={str(eos): 100}, extra_body={"min_tokens": 4})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens == 5
    # a frequency penalty of 2 breaks the greedy repetition that a bias of +3 on one token makes
    kw = dict(model="tiny", prompt="The", max_tokens=12, temperature=0, logit_bias={str(token): 3}, logprobs=0)
    plain = oai.completions.create(**kw).choices[0].logprobs.tokens
    penalized = oai.completions.create(frequency_penalty=2.0, presence_penalty=0.5, **kw).choices[0].logprobs.tokens
    assert plain.count(tokenizer.decode([token])) > penalized.count(tokenizer.decode([token]))
    echo = oai.completions.create(model="tiny", prompt="Paris is", max_tokens=3, temperature=0, echo=True, logprobs=1)
    same = oai.completions.create(model="tiny", prompt="Paris is", max_tokens=3, temperature=0)
    assert echo.choices[0].text == "Paris is" + same.choices[0].text
    lp = echo.choices[0].logprobs
    n_prompt = len(tokenizer.encode("Paris is"))
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    streamed = oai.completions.create(model="tiny", prompt="Paris is", max_tokens=3, temperature=0, echo=True,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echo.choices[0].text


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_gets_400_with_the_reason_while_other_requests_go_on(tools_server, oai):
    url = tools_server.url
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: chat(oai, model="a2", max_tokens=60, temperature=1.0, seed=1,
                                           extra_body={"ignore_eos": True}))
        bad = [
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
             "strnig", "response_format.json_schema.schema"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "does not exist", None),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}},
             "'launch'", "tool_choice"),
            ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
            ({"logit_bias": {"5": 150}}, "between -100 and 100", "logit_bias"),
            ({"logit_bias": {"99999999": 1}}, "token ids must be in", "logit_bias"),
            ({"presence_penalty": 3}, "between -2 and 2", "presence_penalty"),
            ({"guided_regex": "a(b"}, "unclosed group", "guided_regex"),
            ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "one kind", "guided_regex"),
        ]
        for fields, reason, param in bad:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **fields}
            err = assert_error(httpx.post(url + "/v1/chat/completions", json=body, timeout=30), 400)
            assert reason in err["message"], (fields, err)
            if param:
                assert err["param"] == param, (fields, err)
        answer = running.result(timeout=120)
    assert answer.usage.completion_tokens == 60
    assert httpx.get(url + "/health").status_code == 200


# ---- other clients ------------------------------------------------------------------------------

def test_langchain_with_structured_output_and_bind_tools(tools_server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer with a confidence."""
        answer: str = Field(max_length=12)
        confidence: int = Field(ge=0, le=10)

    llm = ChatOpenAI(base_url=tools_server.url + "/v1", api_key="unused", model="a3", temperature=0.8,
                     max_tokens=200, seed=2, max_retries=0)
    # json_mode (response_format json_object) is left out: any JSON object is allowed there, and a
    # random model's object need not be an Answer (test_json_schema_outputs_... covers json_object).
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Answer, method=method).invoke("What is the capital of France?")
        assert isinstance(result, Answer) and 0 <= result.confidence <= 10
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    msg = bound.invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER_PARAMS)


def test_lorax_client_response_format(tools_server):
    from lorax import Client

    client = Client(tools_server.url, timeout=120)
    for adapter in (None, "a1"):
        r = client.generate("Person:", adapter_id=adapter, max_new_tokens=120, do_sample=True, seed=3,
                            response_format={"type": "json_object", "schema": PERSON})
        jsonschema.validate(json.loads(r.generated_text), PERSON)
        assert r.details.finish_reason in ("eos_token", "stop_sequence")
    text = "".join(ev.token.text for ev in client.generate_stream(
        "Person:", max_new_tokens=120, response_format={"type": "json_object", "schema": PERSON}))
    jsonschema.validate(json.loads(text), PERSON)
    err = assert_error(httpx.post(tools_server.url + "/generate", json={
        "inputs": "x", "parameters": {"response_format": {"type": "json_object", "schema": {"type": "strnig"}}}}), 400)
    assert "strnig" in err["message"] and err["param"] == "parameters.response_format.schema"
    # typical_p samples (TGI: any warper turns sampling on), reproducibly with a seed
    typical = [client.generate("Paris is", typical_p=0.4, seed=7, max_new_tokens=10) for _ in range(2)]
    assert typical[0].generated_text == typical[1].generated_text and typical[0].details.seed == 7
    err = assert_error(httpx.post(tools_server.url + "/generate", json={
        "inputs": "x", "parameters": {"typical_p": 1.5}}), 400)
    assert err["param"] == "parameters.typical_p"


# ---- the Responses API ------------------------------------------------------------------------

def test_responses_api_matches_chat_and_streams_the_documented_events(oai):
    kw = dict(model="a1", max_output_tokens=8, temperature=0)
    resp = oai.responses.create(input="Paris is", instructions="Be brief.", **kw)
    same = chat(oai, model="a1", max_tokens=8, temperature=0,
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is"}])
    assert resp.output_text == same.choices[0].message.content and resp.output_text
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.input_tokens == same.usage.prompt_tokens and resp.usage.output_tokens == 8

    events = list(oai.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "Paris is"}]}],
                                       instructions="Be brief.", stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert events[-1].response.output[0].content[0].text == resp.output_text


def test_responses_api_json_schema_and_function_tools(oai):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    resp = oai.responses.create(model="a2", input="A person:", text=fmt, temperature=1.0, max_output_tokens=150)
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), PERSON)

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: str = Field(pattern="^(cat|dog)$")
        legs: int = Field(ge=0, le=4)

    parsed = oai.responses.parse(model="a1", input="a pet", text_format=Pet, temperature=1.0, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Pet) and parsed.output_parsed.kind in ("cat", "dog")

    tool = {"type": "function", **WEATHER["function"]}
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": '{"city": "Rome", "unit": "c"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
               {"role": "user", "content": "And in Paris?"}]
    for stream in (False, True):
        kw = dict(model="a3", input=history, tools=[tool], tool_choice="required", parallel_tool_calls=False,
                  temperature=1.0, max_output_tokens=200)
        if not stream:
            resp = oai.responses.create(**kw)
        else:
            events = list(oai.responses.create(stream=True, **kw))
            kinds = [e.type for e in events]
            assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                                  "response.function_call_arguments.done", "response.output_item.done"]
            resp = events[-1].response
        assert resp.status == "completed"
        [call] = resp.output
        assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)


def test_responses_api_refuses_what_it_cannot_do(tools_server):
    url = tools_server.url + "/v1/responses"
    err = assert_error(httpx.post(url, json={"input": "hi", "previous_response_id": "resp_1"}), 400)
    assert "does not store responses" in err["message"] and err["param"] == "previous_response_id"
    err = assert_error(httpx.post(url, json={"input": "hi", "tools": [{"type": "web_search"}]}), 400)
    assert "function tools only" in err["message"]
    err = assert_error(httpx.post(url, json={"input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "strnig"}}}}), 400)
    assert "strnig" in err["message"]
    assert_error(httpx.get(url + "/resp_1"), 404)


# ---- per-request adapter merging ---------------------------------------------------------------

def test_lorax_merged_adapters_equal_the_peft_merge_and_are_cached(tools_server):
    from lorax import Client
    from lorax.types import MergedAdapters

    client = Client(tools_server.url, timeout=120)
    merged = MergedAdapters(ids=["h13m1", "h13m2"], weights=MERGE_WEIGHTS, merge_strategy="linear", density=1.0)
    kw = dict(max_new_tokens=12, decoder_input_details=True)
    ours = client.generate("Paris is the capital", merged_adapters=merged, **kw)
    peft = client.generate("Paris is the capital", adapter_id="h13ref", **kw)
    base = client.generate("Paris is the capital", **kw)
    assert [t.id for t in ours.details.tokens] == [t.id for t in peft.details.tokens]
    for a, b in zip(ours.details.tokens + ours.details.prefill[1:], peft.details.tokens + peft.details.prefill[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert [t.logprob for t in ours.details.prefill[1:]] != pytest.approx([t.logprob for t in base.details.prefill[1:]],
                                                                          abs=1e-3)
    again = client.generate("Paris is the capital", merged_adapters=merged, **kw)
    assert again.generated_text == ours.generated_text
    ties = MergedAdapters(ids=["h13m1", "h13m2"], weights=MERGE_WEIGHTS, merge_strategy="dare_ties", density=0.5,
                          majority_sign_method="frequency")
    text = "".join(ev.token.text for ev in client.generate_stream("Paris is the capital", merged_adapters=ties,
                                                                   max_new_tokens=8))
    assert text
    models = [m["id"] for m in httpx.get(tools_server.url + "/v1/models").json()["data"]]
    assert len([m for m in models if m.startswith("merged-")]) == 2  # one per distinct merge, however often used


def test_bad_merges_get_400_with_the_reason(tools_server):
    url = tools_server.url + "/generate"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, url, json={"inputs": "x", "parameters": {
            "adapter_id": "a1", "max_new_tokens": 40, "ignore_eos_token": True}}, timeout=120)
        for merged, reason, param in [
            ({"ids": ["h13m1", "nope"], "weights": [1, 1], "density": 1}, "'nope' does not exist",
             "parameters.merged_adapters.ids"),
            ({"ids": ["h13m1", "h13m2"], "weights": [1], "density": 1}, "2 ids but 1 weights",
             "parameters.merged_adapters.weights"),
            ({"ids": ["h13m1", "a1"], "weights": [1, 1], "density": 1}, "same rank", "parameters.merged_adapters.ids"),
            ({"ids": ["h13m1"], "weights": [1], "density": 1, "merge_strategy": "svd"}, "merge_strategy",
             "parameters.merged_adapters.merge_strategy"),
        ]:
            r = httpx.post(url, json={"inputs": "x", "parameters": {"merged_adapters": merged}}, timeout=60)
            err = assert_error(r, 400)
            assert reason in err["message"] and err["param"] == param, err
            assert r.json()["error_type"] == "validation"
        done = running.result(timeout=120)
    assert done.status_code == 200 and done.json()["generated_text"]
