"""Soak: concurrent requests over mixed adapters and routes, with 10% of streams dropped by the
client and 5% bad inputs, against a real `loraplex-engine` process. No 5xx, nothing hung, and
every gauge back to zero (no sequence, queue entry or KV block left behind) afterwards."""
from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import pytest

from tests.engine.api.conftest import engine_process, parse_metrics, wait_until, write_manifest_file

REQUESTS = 240
CONCURRENCY = 16
REQUEST_TIMEOUT = 60.0  # seconds: a request taking longer counts as hung
MODELS = [None, "a1", "a2", "a3"]  # the base, a preloaded adapter, two loaded on demand
PROMPTS = ["The quick brown fox", "Paris is the capital of France. Berlin is", "0123456789", "LoRA adapters share"]
GAUGES = re.compile(r"(num_requests_running|num_requests_waiting|kv_cache_usage)")


@pytest.fixture(scope="module")
def soak_server(assets):
    manifest = assets.root / "soak-manifest.json"
    write_manifest_file(manifest, [{"name": "a2", "source": "local", "uri": "a2"},
                                   {"name": "a3", "source": "local", "uri": "a3"}])
    with engine_process("soak", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "96",
        "--block-size", "8", "--max-num-seqs", "8", "--max-model-len", "256", "--max-waiting", "64",
        "--adapter-dir", str(assets.adapter_dir), "--adapter-manifest-file", str(manifest),
        "--preload-adapters", "a1", "--max-active-adapters", "3",
    ], assets.root / "soak.log") as proc:
        yield proc


def good_request(rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, streamed) for a valid request of a random route, adapter and settings."""
    model = rng.choice(MODELS)
    max_tokens = rng.randint(1, 24)
    stream = rng.random() < 0.5
    kind = rng.choice(["completion", "chat", "lorax"])
    common = {"max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 9)}
    if rng.random() < 0.2:
        common["stop"] = [rng.choice([" ", "e", "\n", "the"])]
    if kind == "completion":
        body = {"prompt": rng.choice(PROMPTS), "n": rng.choice([1, 1, 2]), "logprobs": rng.choice([None, 2]), **common}
        if model:
            body["model"] = model
        return "/v1/completions", body, stream
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], **common}
        if model:
            body["model"] = model
        return "/v1/chat/completions", body, stream
    params = {"max_new_tokens": max_tokens, "details": True, "stop": common.get("stop", [])}
    if model:
        params["adapter_id"] = model
    return ("/generate_stream" if stream else "/generate"), {"inputs": rng.choice(PROMPTS), "parameters": params}, stream


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-adapter"}),
    ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 4}),  # longer than --max-model-len
    ("/v1/completions", {"prompt": [10**7, 3], "max_tokens": 2}),  # token ids outside the vocabulary
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 10**6}),
    ("/generate", {"inputs": "", "parameters": {"max_new_tokens": 3}}),
    ("/v1/completions", "{not json"),
]


async def one(client: httpx.AsyncClient, rng: random.Random, i: int) -> tuple[str, int]:
    """Send request i; returns (what it was, HTTP status)."""
    roll = rng.random()
    if roll < 0.05:  # bad input
        path, body = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
        r = await client.post(path, **kw)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
        return "bad", r.status_code
    path, body, stream = good_request(rng)
    if roll < 0.15:  # a stream the client drops after its first chunk
        body = {**body, "max_tokens": 200} if "max_tokens" in body else body
        body.pop("stop", None)
        if path.startswith("/v1/"):
            body["stream"] = True
        else:
            path = "/generate_stream"
            body["parameters"]["max_new_tokens"] = 200
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, (path, body, r.status_code)
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break  # leave: the context manager closes the connection mid-stream
        return "dropped", r.status_code
    if stream:
        if path.startswith("/v1/"):
            body["stream"] = True
        events = []
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, (path, body, r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    events.append(json.loads(line[5:]))
        assert events and not any("error" in e for e in events), (path, body, events[-1:])
        return "stream", r.status_code
    r = await client.post(path, json=body)
    assert r.status_code == 200, (path, body, r.status_code, r.text)
    return "plain", r.status_code


@pytest.mark.slow
def test_soak_mixed_adapters_dropped_streams_and_bad_inputs(soak_server):
    rng = random.Random(1234)
    seeds = [rng.randrange(2**32) for _ in range(REQUESTS)]

    async def run():
        limits = httpx.Limits(max_connections=CONCURRENCY * 2)
        async with httpx.AsyncClient(base_url=soak_server.url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def bounded(i):
                async with gate:
                    return await asyncio.wait_for(one(client, random.Random(seeds[i]), i), REQUEST_TIMEOUT)

            return await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))

    results = asyncio.run(run())
    kinds = {k: sum(1 for kind, _ in results if kind == k) for k in ("plain", "stream", "dropped", "bad")}
    print("soak:", kinds)
    assert all(status < 500 for _, status in results)
    assert kinds["dropped"] >= REQUESTS // 20 and kinds["bad"] >= REQUESTS // 50, kinds

    def idle():
        info = httpx.get(soak_server.url + "/info").json()
        gauges = {name: v for (name, _), v in parse_metrics(httpx.get(soak_server.url + "/metrics").text).items()
                  if GAUGES.search(name)}
        done = info["num_free_blocks"] == info["num_blocks"] and gauges and not any(gauges.values())
        return done or None

    wait_until(idle, 30, "every gauge back to zero and every KV block free")
    samples = parse_metrics(httpx.get(soak_server.url + "/metrics").text)
    server_errors = {k: v for k, v in samples.items() if k[0] == "loraplex_requests_total" and dict(k[1]).get("status", "").startswith("5")}
    assert not any(server_errors.values()), server_errors
    assert soak_server.proc.poll() is None, soak_server.log_tail()
