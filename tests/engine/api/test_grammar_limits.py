"""Structured output is bounded (issue 20, finding 1, "grammar bomb"): a grammar whose lexer
would blow up is refused with a 4xx or runs within llguidance's limits, the engine's memory
stays within the grammar budget however many distinct bombs arrive, a grammar not ready
within --grammar-timeout gets 400 grammar_too_complex, and a compile that finds no free worker
within it gets 503 grammar_busy. Through HTTP against real engine processes."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.engine.api.conftest import assert_error, engine_process
from tests.engine.api.grammar_bombs import bomb, rss_mib

BOMBS = 14
# The open server's budget is the default --grammar-cache-bytes (256 MiB); the rest covers the
# grammars being compiled (2 workers, ~45 MiB each at most) and the allocator's slack.
RSS_GROWTH_MIB = 512


def completion(url: str, model: str, fields: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=timeout,
                      json={"model": model, "prompt": "x", "max_tokens": 4, "temperature": 0.0, **fields})


def base_model(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def check_bounded(resp: httpx.Response) -> None:
    """A bomb is either refused with a clear 400 or answered (ended by the limits)."""
    if resp.status_code == 200:
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length"), resp.text
    else:
        err = assert_error(resp, 400)
        assert err["code"] in ("grammar_too_complex", "invalid_grammar"), err


def test_grammar_bombs_are_bounded_in_time_and_memory(open_server):
    model = base_model(open_server.url)
    warm = completion(open_server.url, model, {"guided_regex": "[a-f0-9]{4}"})  # llguidance's tokenizer, once
    assert warm.status_code == 200, warm.text
    before = rss_mib(open_server.proc.pid)
    slowest = 0.0
    for i in range(BOMBS):
        t0 = time.perf_counter()
        resp = completion(open_server.url, model, bomb(i))
        slowest = max(slowest, time.perf_counter() - t0)
        check_bounded(resp)
    grown = rss_mib(open_server.proc.pid) - before
    print(f"{BOMBS} distinct bombs: RSS grew {grown:.0f} MiB (bound {RSS_GROWTH_MIB}); slowest answer {slowest:.2f} s")
    # Before the limits: ~200 MiB per bomb, never given back (531 -> 3,203 MiB after 16).
    assert grown < RSS_GROWTH_MIB, f"RSS grew {grown:.0f} MiB after {BOMBS} grammar bombs"
    ok = completion(open_server.url, model, {"guided_regex": "[a-f0-9]{8}", "max_tokens": 12})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 8, ok.text


@pytest.fixture(scope="module")
def strict_server(assets):
    """One compile worker and a 50 ms time-out: any bomb (200 ms or more even within the limits,
    measured 0.2-0.5 s here) misses it."""
    with engine_process("strict", ["--model-id", str(assets.base), "--device", "cpu", "--num-kv-blocks", "64",
                                   "--grammar-workers", "1", "--grammar-timeout", "0.05"],
                        assets.root / "strict.log") as proc:
        yield proc


def test_a_grammar_late_for_its_first_mask_is_refused_and_a_queued_one_is_busy(strict_server):
    url, model = strict_server.url, base_model(strict_server.url)

    async def two_bombs():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            first = asyncio.create_task(ac.post("/v1/completions", json={"model": model, "prompt": "x", **bomb(0)}))
            await asyncio.sleep(0.01)  # so that the first takes the one worker
            second = await ac.post("/v1/completions", json={"model": model, "prompt": "x", **bomb(1)})
            return await first, second

    late, queued = asyncio.run(two_bombs())
    err = assert_error(late, 400, "grammar_too_complex")
    assert "not ready within 0.05 s" in err["message"] and err["param"] == "guided_regex", err
    busy = assert_error(queued, 503, "grammar_busy")
    assert queued.headers.get("retry-after") == "1", (queued.headers, busy)

    # The same grammar again is refused at once, from memory, without another compile.
    t0 = time.perf_counter()
    again = completion(url, model, bomb(0))
    assert "not ready within" in assert_error(again, 400, "grammar_too_complex")["message"]
    print(f"a refused grammar again: answered in {time.perf_counter() - t0:.3f} s")
    plain = completion(url, model, {"max_tokens": 2})
    assert plain.status_code == 200, plain.text  # the engine goes on serving
