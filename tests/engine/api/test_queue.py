"""A full queue answers 429; an adapter that fails while requests wait ends them with an error
(non-streamed: 424 error body; streamed: an SSE error event, then [DONE]).

Requests for an adapter whose S3 download hangs stay queued for as long as the test wants: the
fake S3 endpoint (conftest.StallingS3) answers only when released, and then with a 404.
"""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.engine.api.conftest import ADMIN, KEY_A, MAX_WAITING, assert_error, metric, parse_metrics, wait_until


def waiting(server) -> float:
    return metric(parse_metrics(httpx.get(server.url + "/metrics").text), "loraplex_num_requests_waiting")


def test_queue_full_then_adapter_failure(server, stalling_s3):
    r = httpx.put(server.url + "/v1/adapters/slow", headers=ADMIN,
                  json={"name": "slow", "source": "s3", "uri": "s3://test-bucket/slow"})
    assert r.status_code == 200 and r.json()["state"] == "registered"
    body = {"model": "slow", "prompt": "hi", "max_tokens": 2}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=KEY_A, timeout=120) as ac:
            async def stream_one():
                async with ac.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                    assert resp.status_code == 200
                    return [line async for line in resp.aiter_lines() if line]

            streams = [asyncio.create_task(stream_one()) for _ in range(MAX_WAITING - 1)]
            plain = asyncio.create_task(ac.post("/v1/completions", json=body))
            deadline = asyncio.get_running_loop().time() + 30
            while waiting(server) < MAX_WAITING:
                ended = [t for t in [*streams, plain] if t.done()]
                assert not ended, f"a queued request ended early: {ended[0].result()!r}"
                assert asyncio.get_running_loop().time() < deadline, "the queue never filled up"
                await asyncio.sleep(0.05)
            assert httpx.get(server.url + "/v1/adapters/slow", headers=ADMIN).json()["state"] == "loading"
            # the queue is full: the next request of any kind is refused at once
            full = await ac.post("/v1/completions", json={**body, "model": "a1"})
            assert_error(full, 429, "queue_full")
            lorax = await ac.post("/generate", json={"inputs": "hi"})
            assert_error(lorax, 429, "queue_full")
            assert lorax.json()["error_type"] == "overloaded"
            stalling_s3.release()  # the download now fails: every waiting request ends with the reason
            return await asyncio.gather(*streams), await plain

    stream_lines, plain = asyncio.run(scenario())
    err = assert_error(plain, 424, "adapter_failed")
    assert "slow" in err["message"]
    for lines in stream_lines:
        assert lines[-1] == "data: [DONE]"
        event = json.loads(lines[-2][len("data: "):])
        assert event["error"]["code"] == "adapter_failed"
    assert httpx.get(server.url + "/v1/adapters/slow", headers=ADMIN).json()["state"] == "failed"
    wait_until(lambda: waiting(server) == 0, 10, "an empty queue")
    # a failed adapter is refused up front now, and the server serves others as before
    assert_error(httpx.post(server.url + "/v1/completions", headers=KEY_A, json=body), 424, "adapter_failed")
    ok = httpx.post(server.url + "/v1/completions", headers=KEY_A, timeout=60, json={**body, "model": "a1"})
    assert ok.status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/slow", headers=ADMIN).status_code == 200
