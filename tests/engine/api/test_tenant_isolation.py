"""One tenant must never hurt another (issue 20): while tenant A sends the worst structured-output
requests it can (grammar bombs of every construction, several at once, in a bounded loop),
tenant B's plain 1-token requests keep their latency, and the engine's memory stays bounded.
Through HTTP against the shared `server` (two tenants' API keys)."""
from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.engine.api.conftest import KEY_A, KEY_B
from tests.engine.api.grammar_bombs import bomb, rss_mib

ATTACKERS = 4
ATTACK_SECONDS = 10.0  # tenant B's requests, back to back, for this long under attack
# Default --grammar-cache-bytes (256 MiB) + 2 compile workers (~45 MiB each) + allocator slack.
RSS_GROWTH_MIB = 512
PLAIN = {"model": "tiny-base", "prompt": "hello", "max_tokens": 1, "temperature": 0.0}


def timed_plain(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    resp = client.post("/v1/completions", json=PLAIN)
    assert resp.status_code == 200, resp.text
    return time.perf_counter() - t0


@pytest.mark.slow
def test_grammar_bombs_do_not_slow_another_tenants_requests(server):
    with httpx.Client(base_url=server.url, headers=KEY_B, timeout=120) as victim:
        for _ in range(3):
            timed_plain(victim)  # warm
        solo = statistics.median(timed_plain(victim) for _ in range(20))

        before = rss_mib(server.proc.pid)
        stop = threading.Event()
        statuses: list[int] = []

        def attack(k: int) -> None:
            with httpx.Client(base_url=server.url, headers=KEY_A, timeout=120) as a:
                i = k
                while not stop.is_set():
                    resp = a.post("/v1/completions", json={"model": "tiny-base", "prompt": "x", "max_tokens": 16,
                                                           **bomb(i)})
                    statuses.append(resp.status_code)
                    i += ATTACKERS  # every request a grammar never seen before: no cache hit helps

        attackers = [threading.Thread(target=attack, args=(k,), daemon=True) for k in range(ATTACKERS)]
        for t in attackers:
            t.start()
        time.sleep(1.0)  # the attack is under way
        under = []
        deadline = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < deadline:
            under.append(timed_plain(victim))
        stop.set()
        for t in attackers:
            t.join(60)
        grown = rss_mib(server.proc.pid) - before

    p50 = statistics.median(under)
    bound = max(10 * solo, solo + 0.5)
    print(f"tenant B 1-token p50: solo {solo * 1000:.0f} ms, under attack {p50 * 1000:.0f} ms "
          f"(max {max(under) * 1000:.0f} ms, {len(under)} requests; bound {bound * 1000:.0f} ms); "
          f"{len(statuses)} bomb requests {sorted(set(statuses))}; RSS grew {grown:.0f} MiB (bound {RSS_GROWTH_MIB})")
    assert len(statuses) >= 2 * ATTACKERS, "the attack barely ran"
    assert set(statuses) <= {200, 400, 503}, statuses  # bounded answers, never a 5xx crash
    assert len(under) >= 10, f"tenant B got only {len(under)} answers in {ATTACK_SECONDS} s"
    assert p50 < bound, f"tenant B's p50 went from {solo * 1000:.0f} ms to {p50 * 1000:.0f} ms"
    assert grown < RSS_GROWTH_MIB, f"RSS grew {grown:.0f} MiB"
