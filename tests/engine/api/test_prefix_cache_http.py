"""Prefix caching over HTTP: hit and query counters in /metrics (loraplex_* and vllm:*), not
shared across adapters, and --no-enable-prefix-caching turns it off with the same outputs."""
from __future__ import annotations

import httpx

from tests.engine.api.conftest import EngineProcess, metric, parse_metrics, wait_until

PREFIX = "LoRA adapters share one base model; the KV cache is paged in blocks. " * 3  # > 4 blocks of 16
NAMES = ("loraplex_prefix_cache_queries_total", "loraplex_prefix_cache_hits_total",
         "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


def counters(url: str) -> dict[str, float]:
    samples = parse_metrics(httpx.get(url + "/metrics").text)
    return {name: metric(samples, name) for name in NAMES}


def complete(url: str, headers: dict, model: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def traffic(url: str, headers: dict, base: str) -> list[tuple[dict, dict]]:
    """Four requests sharing PREFIX, with the counters' deltas after each."""
    out = []
    for model, suffix in ((base, "Paris"), (base, "Berlin"), ("a2", "Paris"), ("a2", "Berlin")):
        before = counters(url)
        body = complete(url, headers, model, PREFIX + suffix)
        after = counters(url)
        out.append((body, {k: after[k] - before[k] for k in NAMES}))
    return out


def test_prefix_cache_counters_per_adapter_and_the_off_switch(server, client, assets):
    on = traffic(server.url, dict(client.headers), "tiny-base")
    for body, delta in on:  # every request was looked up, all its prompt tokens counted
        assert delta["loraplex_prefix_cache_queries_total"] == body["usage"]["prompt_tokens"]
        assert delta["vllm:prefix_cache_queries_total"] == delta["loraplex_prefix_cache_queries_total"]
        assert delta["vllm:prefix_cache_hits_total"] == delta["loraplex_prefix_cache_hits_total"]
    hits = [delta["loraplex_prefix_cache_hits_total"] for _, delta in on]
    # the base's second request reuses the first's prefix blocks; a2's first reuses nothing
    # (same tokens, other adapter); a2's second reuses a2's
    assert hits[0] == 0 and hits[1] >= 64 and hits[2] == 0 and hits[3] == hits[1]

    off = EngineProcess("no-prefix-cache", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-kv-blocks", "64", "--served-model-name", "tiny-base",
        "--adapter-dir", str(assets.adapter_dir), "--adapter-manifest-file", str(assets.manifest_file),
        "--no-enable-prefix-caching"], assets.root / "no-prefix-cache.log")
    try:
        off.wait_ready()
        assert httpx.get(off.url + "/info").json()["enable_prefix_caching"] is False
        wait_until(lambda: any(m["id"] == "a2" for m in httpx.get(off.url + "/v1/models").json()["data"]),
                   30, "a2 registered from the manifest file")
        off_results = traffic(off.url, {}, "tiny-base")
    finally:
        off.stop()
    for (got, _), (want, delta) in zip(on, off_results):
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert all(v == 0 for v in delta.values()), delta
