"""Tenant quotas through the real app and the real lifecycle (uvicorn in this process, the tiny
model): OpenAI's x-ratelimit-* headers on every answer (JSON, SSE, errors), a 429 with an
OpenAI-style body and Retry-After past a limit (requests, tokens, concurrency), the quota
settled with the tokens actually used, and the openai SDK's own retries completing every
request under a quota."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from loraplex.engine.api.app import create_app
from loraplex.engine.api.settings import ServerSettings
from tests.engine.api.conftest import assert_error, auth, wait_until
from tests.engine.api.test_usage_http import Served, engine_factory

KEYS = {
    "two-a-minute": {"keys": ["k-two"], "limits": {"requests_per_minute": 2}},
    "small-tokens": {"keys": ["k-tok"], "limits": {"tokens_per_minute": 40}},
    "one-at-a-time": {"keys": ["k-one"], "limits": {"max_concurrent": 1}},
    "sdk": {"keys": ["k-sdk"], "limits": {"requests_per_minute": 60}},
    "free": ["k-free"],
}
BODY = {"model": "tiny", "prompt": "Hello there", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("quotas-http")
    keys = root / "keys.json"
    keys.write_text(json.dumps(KEYS))
    with Served(create_app(engine_factory(assets.base), ServerSettings(api_keys_file=str(keys)))) as s:
        wait_until(lambda: httpx.get(s.url + "/ready").status_code == 200, 120, "the tiny model")
        yield s


def post(served, key: str, path: str = "/v1/completions", **body) -> httpx.Response:
    return httpx.post(served.url + path, headers=auth(key), json={**BODY, **body}, timeout=60)


def test_requests_per_minute_headers_then_429_with_retry_after(served):
    first, second = post(served, "k-two"), post(served, "k-two")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == ["1", "0"]
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")
    third = post(served, "k-two")
    err = assert_error(third, 429, "rate_limit_exceeded")
    assert "requests" in err["message"]
    assert 1 <= int(third.headers["retry-after"]) <= 30  # one request refills in 30 s
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    # the other routes answer the same way, LoRAX and streams included
    assert post(served, "k-two", "/generate", inputs="Hi", parameters={"max_new_tokens": 1}).status_code == 429
    assert post(served, "k-two", stream=True).status_code == 429
    # a tenant without limits gets no headers and no 429
    free = post(served, "k-free")
    assert free.status_code == 200 and not any(h.startswith("x-ratelimit") for h in free.headers)


def test_tokens_per_minute_reserve_prompt_plus_max_output_and_settle_with_actual_use(served):
    # 40 tokens a minute; a prompt of a few tokens with max_tokens 30 reserves ~35 of them
    ok = post(served, "k-tok", max_tokens=30, stop=[" "], ignore_eos=False)
    assert ok.status_code == 200, ok.text
    used = ok.json()["usage"]["total_tokens"]
    limit = int(ok.headers["x-ratelimit-limit-tokens"])
    assert limit == 40
    # settled: what the answer did not use is back (the headers of the next answer show it)
    again = post(served, "k-tok", max_tokens=1)
    assert again.status_code == 200, again.text
    remaining = int(again.headers["x-ratelimit-remaining-tokens"])
    assert remaining >= limit - used - again.json()["usage"]["total_tokens"] - 1
    over = post(served, "k-tok", max_tokens=39)  # more than what is left
    err = assert_error(over, 429, "rate_limit_exceeded")
    assert "tokens" in err["message"] and int(over.headers["retry-after"]) >= 1


def test_max_concurrent_refuses_a_second_request_while_one_is_in_flight(served):
    async def run():
        async with httpx.AsyncClient(base_url=served.url, headers=auth("k-one"), timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 64, "ignore_eos": True,
                                                                "stream": True}) as long:
                assert long.status_code == 200
                second = await c.post("/v1/completions", json=BODY)
                assert_error(second, 429, "rate_limit_exceeded")
                assert "concurrent" in second.json()["error"]["message"]
                assert second.headers["retry-after"]
                async for _ in long.aiter_lines():
                    pass
            after = await c.post("/v1/completions", json=BODY)  # the slot is free again
            assert after.status_code == 200, after.text

    asyncio.run(run())


def test_the_openai_sdk_completes_every_request_under_a_quota(served):
    """60 requests a minute: a burst of 63 spends the bucket; the SDK's default retries wait what
    each 429 says (retry-after-ms) and every request completes."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="k-sdk")  # default max_retries (2)
    texts = [client.completions.create(model="tiny", prompt="Hello", max_tokens=1, temperature=0).choices[0].text
             for _ in range(63)]
    assert len(texts) == 63
    usage = httpx.get(served.url + "/v1/usage", headers=auth("k-sdk")).json()["data"][0]
    assert usage["requests"]["success"] == 63
    assert usage["requests"]["rate_limited"] >= 1 and usage["rate_limited"]["requests"] >= 1  # it was throttled
