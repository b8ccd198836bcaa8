"""SSE read byte by byte with httpx, concurrency across adapters, and client disconnects."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.engine.api.conftest import KEY_A, metric, parse_metrics, wait_until

PROMPT = "Continuous batching admits"


def read_sse(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE stream, checking the framing on the way."""
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.read().decode()
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw.split("\n\n")[:-1]
    payloads = []
    for event in events:
        lines = event.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), event
        payloads.append(lines[0][len("data: "):])
    return payloads


def test_raw_sse_completions(client):
    body = {"model": "a2", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True, "logprobs": 1,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        payloads = read_sse(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == "a2" for c in chunks)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 5
    token_chunks = chunks[:-1]
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in token_chunks) == 5
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    full = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]


def test_raw_sse_chat_and_lorax(client):
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        payloads = read_sse(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {
            "adapter_id": "a3", "max_new_tokens": 3, "ignore_eos_token": True, "details": True}}) as r:
        payloads = read_sse(r)
    events = [json.loads(p) for p in payloads]  # no [DONE] on LoRAX streams
    assert [e["generated_text"] is not None for e in events] == [False, False, True]
    assert events[-1]["details"]["generated_tokens"] == 3


REQUESTS = [(model, prompt) for model in ("tiny-base", "a1", "a2", "a3")
            for prompt in ("The quick brown fox", "Paris is the capital of France. Berlin")]


def _completion(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}


def test_concurrent_requests_match_sequential(client, server):
    sequential = []
    for model, prompt in REQUESTS:
        r = client.post("/v1/completions", json=_completion(model, prompt))
        assert r.status_code == 200, r.text
        sequential.append(r.json()["choices"][0])

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, headers=KEY_A, timeout=120) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/completions", json=_completion(m, p)) for m, p in REQUESTS))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json()["choices"][0] for r in rs]

    concurrent = asyncio.run(all_at_once())
    for (model, prompt), seq, conc in zip(REQUESTS, sequential, concurrent):
        assert conc["text"] == seq["text"], (model, prompt)
        assert conc["logprobs"]["tokens"] == seq["logprobs"]["tokens"], (model, prompt)
    # the adapters made a difference (the batch really mixed different models)
    assert len({c["text"] for c in concurrent}) > len(REQUESTS) // 2


def _idle_blocks(server) -> bool:
    info = httpx.get(server.url + "/info").json()
    return info["num_free_blocks"] == info["num_blocks"] and info["num_requests_running"] == 0


def test_client_disconnect_frees_kv_blocks(server):
    wait_until(lambda: _idle_blocks(server), 30, "an idle engine before the test")
    before = parse_metrics(httpx.get(server.url + "/metrics").text)
    # long enough (ignore_eos, the whole context) that it is still running when dropped
    body = {"model": "a1", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers=KEY_A, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 2:
                        info = httpx.get(server.url + "/info").json()
                        assert info["num_free_blocks"] < info["num_blocks"]  # it holds KV right now
                        break
    # leaving the `with` closes the connection mid-stream
    wait_until(lambda: _idle_blocks(server), 30, "the dropped stream's blocks to come back")
    after = parse_metrics(httpx.get(server.url + "/metrics").text)
    assert metric(after, "loraplex_kv_cache_usage_ratio") == 0.0
    assert metric(after, "loraplex_requests_total", adapter="a1", status="499") == \
        metric(before, "loraplex_requests_total", adapter="a1", status="499") + 1
    generated = metric(after, "loraplex_generation_tokens_total", adapter="a1") - \
        metric(before, "loraplex_generation_tokens_total", adapter="a1")
    assert 2 <= generated < 480  # cut short, not run to the end


def test_non_streamed_request_disconnect_aborts(server):
    """A client that gives up on a non-streamed request also frees its sequence."""
    wait_until(lambda: _idle_blocks(server), 30, "an idle engine before the test")
    body = {"model": "a2", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True}

    async def give_up():
        async with httpx.AsyncClient(base_url=server.url, headers=KEY_A, timeout=60) as ac:
            task = asyncio.create_task(ac.post("/v1/completions", json=body))

            def running():
                return httpx.get(server.url + "/info").json()["num_requests_running"] == 1

            while not running():
                await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    before = parse_metrics(httpx.get(server.url + "/metrics").text)
    asyncio.run(give_up())
    wait_until(lambda: _idle_blocks(server), 30, "the abandoned request's blocks to come back")
    after = parse_metrics(httpx.get(server.url + "/metrics").text)
    assert metric(after, "loraplex_requests_total", adapter="a2", status="499") == \
        metric(before, "loraplex_requests_total", adapter="a2", status="499") + 1
