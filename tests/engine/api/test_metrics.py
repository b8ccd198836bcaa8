"""/metrics, parsed with prometheus_client's parser, before and after known traffic."""
from __future__ import annotations

import re

import httpx

from tests.engine.api.conftest import ADMIN, ADMIN_TOKEN, KEY_A, METRICS_TOKEN, metric, parse_metrics, wait_until

PROMPT = "LoRA adapters share one base model"


def scrape(server) -> dict:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def test_request_counters_move(server, client):
    wait_until(lambda: metric(scrape(server), "loraplex_num_requests_running") == 0, 30, "an idle engine")
    before = scrape(server)
    usages = []
    for _ in range(2):
        r = client.post("/v1/completions", json={"model": "a2", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                 "ignore_eos": True})
        usages.append(r.json()["usage"])
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "a3", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        r.read()
    lorax = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True,
                                                                            "ignore_eos_token": True}}).json()
    after = scrape(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraplex_requests_total", adapter="a2", status="200") == 2
    assert delta("loraplex_requests_total", adapter="a3", status="200") == 1
    assert delta("loraplex_requests_total", adapter="tiny-base", status="200") == 1
    assert delta("loraplex_prompt_tokens_total", adapter="a2") == sum(u["prompt_tokens"] for u in usages)
    assert delta("loraplex_generation_tokens_total", adapter="a2") == 8
    assert delta("loraplex_generation_tokens_total", adapter="a3") == 3
    assert delta("loraplex_generation_tokens_total", adapter="tiny-base") == 5
    assert delta("loraplex_prompt_tokens_total", adapter="tiny-base") == lorax["details"]["prompt_tokens"]
    assert delta("loraplex_request_duration_seconds_count", adapter="a2") == 2
    assert delta("loraplex_time_to_first_token_seconds_count", adapter="a2") == 2
    assert delta("loraplex_time_to_first_token_seconds_count", adapter="a3") == 1
    assert delta("loraplex_time_per_output_token_seconds_count") == 4
    assert delta("loraplex_request_duration_seconds_sum", adapter="a2") > 0
    # engine gauges, read at scrape time
    assert metric(after, "loraplex_num_requests_running") == 0
    assert metric(after, "loraplex_num_requests_waiting") == 0
    assert metric(after, "loraplex_kv_cache_usage_ratio") == 0.0


def test_adapter_metrics(server):
    samples = scrape(server)
    registered = httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]
    tiers = {t: metric(samples, "loraplex_adapters", tier=t) for t in ("registered", "loading", "host", "device", "failed")}
    assert sum(tiers.values()) == len(registered)
    assert tiers["device"] >= 1  # a1 is preloaded
    for state in {a["state"] for a in registered}:
        assert tiers[state] == sum(1 for a in registered if a["state"] == state)
    disk_ok = metric(samples, "loraplex_adapter_loads_total", tier="disk", result="ok")
    assert disk_ok >= 1
    assert metric(samples, "loraplex_adapter_loads_total", tier="device", result="ok") >= 1
    # every successful fetch+parse was observed once in the histogram (drained from the engine)
    fetched = sum(v for (name, labels), v in samples.items()
                  if name == "loraplex_adapter_loads_total" and ("result", "ok") in labels
                  and ("tier", "device") not in labels)
    assert metric(samples, "loraplex_adapter_load_seconds_count") == fetched
    text = httpx.get(server.url + "/metrics").text
    for family, kind in (("loraplex_adapter_evictions_total", "counter"), ("loraplex_adapter_load_seconds", "histogram"),
                         ("loraplex_requests_total", "counter"), ("loraplex_kv_cache_usage_ratio", "gauge")):
        assert f"# TYPE {family} {kind}\n" in text


def test_adapter_label_cardinality_is_capped(open_server):
    """The open server keeps at most one per-adapter label value; the rest count as "other"."""
    for name in ("cap-x", "cap-y"):
        r = httpx.put(open_server.url + f"/v1/adapters/{name}", json={"source": "local", "uri": "a2"})
        assert r.status_code == 200, r.text
    for name in ("cap-x", "cap-y", "cap-x", "cap-y"):
        r = httpx.post(open_server.url + "/v1/completions", timeout=60,
                       json={"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
    samples = scrape(open_server)
    base = httpx.get(open_server.url + "/v1/models").json()["data"][0]["id"]
    labels = {dict(lbl)["adapter"] for (name, lbl), _ in samples.items() if name == "loraplex_requests_total"}
    assert len(labels - {base, "unknown", "other"}) == 1, labels
    assert metric(samples, "loraplex_requests_total", adapter="other", status="200") >= 2


def test_restricted_adapters_are_not_named_to_anonymous_callers(server, assets):
    """/metrics, /info and /ready need no credentials: there a restricted adapter (one with
    `tenants`) shows as an opaque `restricted-<12 hex>` id, the same in every view; the admin
    token and the metrics token (--metrics-token-file) see its name. Open adapters keep theirs."""
    r = httpx.post(server.url + "/v1/completions", headers=KEY_A, timeout=60,
                   json={"model": "private-a", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    anonymous = httpx.get(server.url + "/metrics").text
    assert "private-a" not in anonymous
    # (adapters that earlier tests registered and deleted show as ids too: unknown names count
    # as restricted)
    shown = {dict(labels)["adapter"] for name, labels in parse_metrics(anonymous) if name == "loraplex_requests_total"}
    assert {"a2", "tiny-base"} <= shown  # open adapters and the base keep their names
    # the manifest file holds a2, a3 and private-a: /info shows private-a by the id /metrics uses
    info = httpx.get(server.url + "/info").json()["manifest_file"]["adapters"]
    (hidden,) = [n for n in info if n not in ("a2", "a3")]
    assert re.fullmatch(r"restricted-[0-9a-f]{12}", hidden) and hidden in shown, (info, shown)
    for token in (ADMIN_TOKEN, METRICS_TOKEN):
        named = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {token}"}).text
        assert 'adapter="private-a"' in named and "restricted-" not in named
        info = httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {token}"}).json()
        assert "private-a" in info["manifest_file"]["adapters"]
    assert "private-a" not in httpx.get(server.url + "/metrics", headers=KEY_A).text  # an API key is not enough
    # tenant names are one customer's business too: ids to anonymous callers, names to the tokens
    tenants = {dict(labels)["tenant"] for name, labels in parse_metrics(anonymous)
               if name == "loraplex_tenant_requests_total"}
    assert "tenant-a" not in tenants and any(re.fullmatch(r"tenant-[0-9a-f]{12}", t) for t in tenants), tenants
    named = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert 'tenant="tenant-a"' in named


def test_the_router_metric_lists_redact_each_name():
    """vllm:lora_requests_info carries adapter names in comma-separated label values: each name
    is redacted on its own (the list is sorted again), the other labels are left alone."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    from loraplex.engine.api.redaction import RedactedRegistry

    class Router:
        def collect(self):
            g = GaugeMetricFamily("vllm:lora_requests_info", "x",
                                  labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            g.add_metric(["4", "a2,private-a", "private-b"], 1.0)
            yield g

    registry = CollectorRegistry()
    registry.register(Router())
    text = generate_latest(RedactedRegistry(registry, lambda n: "restricted-x" if n.startswith("private") else n))
    assert b'running_lora_adapters="a2,restricted-x"' in text and b'waiting_lora_adapters="restricted-x"' in text
    assert b'max_lora="4"' in text and b"private" not in text
    assert b"private-a" in generate_latest(registry)  # the registry itself is untouched
