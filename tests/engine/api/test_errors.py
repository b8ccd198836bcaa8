"""Bad input on every route: each gets its 4xx in the OpenAI error shape, and the server keeps
serving (checked after every case)."""
from __future__ import annotations

import httpx
import pytest

from tests.engine.api.conftest import ADMIN, KEY_A, MAX_BODY_BYTES, assert_error

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
LORAX_ROUTES = ["/generate", "/generate_stream", "/"]
JSON_ROUTES = [("POST", CMPL), ("POST", CHAT), ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
               ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("PUT", "/v1/adapters/x")]


@pytest.fixture
def still_serving(server):
    """After each test: a normal request still works."""
    yield
    r = httpx.post(server.url + CMPL, headers=KEY_A, timeout=60,
                   json={"model": "a1", "prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").status_code == 200


def headers_for(path: str) -> dict:
    return ADMIN if path.startswith(("/v1/adapters", "/v1/load", "/v1/unload")) else KEY_A


@pytest.mark.parametrize("method,path", JSON_ROUTES)
def test_malformed_json(server, still_serving, method, path):
    for content in (b'{"model": "a1", "prompt": ', b"not json at all", b""):
        r = httpx.request(method, server.url + path, content=content, timeout=30,
                          headers={**headers_for(path), "Content-Type": "application/json"})
        err = assert_error(r, 400)
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("method,path", JSON_ROUTES)
def test_json_that_is_not_an_object(server, still_serving, method, path):
    r = httpx.request(method, server.url + path, json=[1, 2, 3], headers=headers_for(path), timeout=30)
    assert_error(r, 400)


BAD_FIELDS = [
    (CMPL, {"model": "a1", "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    (CMPL, {"model": "a1", "prompt": "hi", "temperature": "hot"}, "temperature"),
    (CMPL, {"model": "a1", "prompt": {"text": "hi"}}, "prompt"),
    (CMPL, {"model": "a1"}, "prompt"),
    (CMPL, {"model": "a1", "prompt": "hi", "n": 0}, "n"),
    (CMPL, {"model": "a1", "prompt": "hi", "n": 1000}, "n"),
    (CMPL, {"model": "a1", "prompt": "hi", "stop": 5}, "stop"),
    (CMPL, {"model": "a1", "prompt": "hi", "logprobs": 99}, "logprobs"),
    (CMPL, {"model": "a1", "prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
    (CMPL, {"model": "a1", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CMPL, {"model": "a1", "prompt": "hi", "temperature": -0.5}, "temperature"),
    (CMPL, {"model": "a1", "prompt": "hi", "top_p": 0}, "top_p"),
    (CMPL, {"model": "a1", "prompt": "hi", "seed": -3}, "seed"),
    (CMPL, {"model": "a1", "prompt": ""}, "prompt"),
    (CMPL, {"model": "a1", "prompt": [10**7]}, "prompt"),
    (CMPL, {"model": "a1", "prompt": "hi", "stop": [""]}, "stop"),
    (CMPL, {"model": "a1", "prompt": "hi", "suffix": "x"}, "suffix"),
    (CMPL, {"model": "a1", "prompt": "hi", "presence_penalty": 5.0}, "presence_penalty"),
    (CMPL, {"model": "a1", "prompt": "hi", "logit_bias": {"3": -101}}, "logit_bias"),
    (CHAT, {"model": "a1", "messages": "hi"}, "messages"),
    (CHAT, {"model": "a1", "messages": []}, "messages"),
    (CHAT, {"model": "a1", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    (CHAT, {"model": "a1", "messages": [{"content": "hi"}]}, "messages.0.role"),
    (CHAT, {"model": "a1", "messages": MSGS, "max_completion_tokens": -1}, "max_tokens"),
    (CHAT, {"model": "a1", "messages": MSGS, "top_logprobs": 2}, None),
    (CHAT, {"model": "a1", "messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"model": "a1", "messages": MSGS, "stream": "yes please"}, "stream"),
    ("/generate", {"inputs": 42}, "inputs"),
    ("/generate", {"inputs": ""}, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "x"}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"best_of": 3}}, "parameters"),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_source": "ftp"}}, "parameters.adapter_source"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"top_k": -5}}, "parameters"),
    ("/", {"inputs": "hi", "parameters": "fast"}, "parameters"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "Not_A_Label", "lora_path": "a1"}, "name"),
    ("/v1/unload_lora_adapter", {"name": "x"}, "lora_name"),
]


@pytest.mark.parametrize("path,body,param", BAD_FIELDS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_FIELDS)])
def test_bad_fields(server, still_serving, path, body, param):
    r = httpx.post(server.url + path, json=body, headers=headers_for(path), timeout=30)
    err = assert_error(r, 400)
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    if path in LORAX_ROUTES:
        assert r.json()["error_type"] == "validation"


def test_unknown_models(server, still_serving):
    for path, body in ((CMPL, {"model": "nope", "prompt": "hi"}), (CHAT, {"model": "nope", "messages": MSGS}),
                       ("/generate", {"inputs": "hi", "parameters": {"adapter_id": "nope"}}),
                       ("/generate_stream", {"inputs": "hi", "parameters": {"adapter_id": "nope"}})):
        err = assert_error(httpx.post(server.url + path, json=body, headers=KEY_A), 404, "model_not_found")
        assert err["param"] in ("model", "parameters.adapter_id")
    assert_error(httpx.get(server.url + "/v1/models/nope", headers=KEY_A), 404)
    assert_error(httpx.get(server.url + "/v1/adapters/nope", headers=ADMIN), 404)
    assert_error(httpx.delete(server.url + "/v1/adapters/nope", headers=ADMIN), 404)


def test_prompt_too_long_is_413(server, still_serving):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 200  # > 512 tokens, < body cap
    for path, body in ((CMPL, {"model": "a1", "prompt": long_prompt}),
                       (CHAT, {"model": "a1", "messages": [{"role": "user", "content": long_prompt}]}),
                       ("/generate", {"inputs": long_prompt})):
        assert_error(httpx.post(server.url + path, json=body, headers=KEY_A), 413, "context_length_exceeded")


def test_oversize_body_is_413_before_parsing(server, still_serving):
    big = b"x" * (MAX_BODY_BYTES + 1)  # not even JSON: the size check comes first
    for method, path in JSON_ROUTES:
        r = httpx.request(method, server.url + path, content=big, headers={**headers_for(path),
                                                                          "Content-Type": "application/json"})
        assert_error(r, 413, "body_too_large")

    def chunks():  # no Content-Length: counted while reading
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096

    r = httpx.post(server.url + CMPL, content=chunks(), headers={**KEY_A, "Content-Type": "application/json"})
    assert_error(r, 413, "body_too_large")


def test_unknown_routes_and_methods(server, still_serving):
    assert_error(httpx.get(server.url + "/v2/nothing"), 404, "not_found")
    assert_error(httpx.post(server.url + "/v1/embeddings", json={}), 404)
    assert_error(httpx.get(server.url + CMPL, headers=KEY_A), 405, "method_not_allowed")
    assert_error(httpx.delete(server.url + "/health"), 405)


def test_no_chat_template_message_on_unsupported_content(server, still_serving):
    body = {"model": "a1", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_error(httpx.post(server.url + CHAT, json=body, headers=KEY_A), 400)


def test_errors_are_counted(server):
    from tests.engine.api.conftest import metric, parse_metrics

    before = parse_metrics(httpx.get(server.url + "/metrics").text)
    httpx.post(server.url + CMPL, json={"model": "nope", "prompt": "hi"}, headers=KEY_A)
    httpx.post(server.url + CMPL, json={"model": "a1", "prompt": "hi", "max_tokens": "x"}, headers=KEY_A)
    httpx.post(server.url + CMPL, json={"model": "a1", "prompt": "hi", "temperature": -1}, headers=KEY_A)
    after = parse_metrics(httpx.get(server.url + "/metrics").text)

    def delta(**labels):
        return metric(after, "loraplex_requests_total", **labels) - metric(before, "loraplex_requests_total", **labels)

    assert delta(adapter="unknown", status="404") == 1
    assert delta(adapter="unknown", status="400") == 1  # the body never parsed: no model known
    assert delta(adapter="a1", status="400") == 1


@pytest.mark.parametrize("method,path", JSON_ROUTES)
def test_a_body_that_is_not_sent_as_json_is_415(server, still_serving, method, path):
    """A web page on another site can make a browser POST a form or text/plain body without a
    preflight (CSRF): every body must come as application/json, on every route that takes one."""
    body = b'{"model": "a1", "prompt": "hello", "max_tokens": 2}'
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None):
        headers = {**headers_for(path), **({"Content-Type": content_type} if content_type else {})}
        r = httpx.request(method, server.url + path, content=body, headers=headers, timeout=60)
        err = assert_error(r, 415, "unsupported_media_type")
        assert "application/json" in err["message"], err
    r = httpx.request(method, server.url + path, content=b"", headers=headers_for(path))  # no body, no type
    assert assert_error(r, 400)["message"] == "the request body must be a JSON object"


def test_json_with_a_charset_is_json(server, still_serving):
    body = b'{"model": "a1", "prompt": "hello", "max_tokens": 2}'
    r = httpx.post(server.url + CMPL, content=body, timeout=60,
                   headers={**KEY_A, "Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text
