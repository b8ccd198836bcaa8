"""Usage metering through the real app (uvicorn in this process, the tiny model), fed by real
inference requests: the totals at GET /v1/usage equal the `usage` fields of the responses
(streamed, not streamed, chat, LoRAX); a key reads its own tenant's totals and never another's;
the admin reads every tenant's; the usage log holds one JSON line per request; without a keys
file the caller's tenant is `default` or the one a gateway names."""
from __future__ import annotations

import json

import httpx
import pytest

from loraplex.engine.api.app import create_app
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.tenants import GATEWAY_TENANT_HEADER
from tests.engine.api.conftest import InProcessServer, assert_error, auth, metric, parse_metrics, wait_until

ADMIN_TOKEN = "usage-admin-token"


class Served(InProcessServer):
    """The app on uvicorn in this process, with helpers for these tests."""

    def complete(self, headers: dict, max_tokens: int = 3, prompt: str = "Hello there", **body) -> dict:
        """A completion; returns its `usage`."""
        r = httpx.post(self.url + "/v1/completions", headers=headers, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    def usage(self, **headers) -> httpx.Response:
        return httpx.get(self.url + "/v1/usage", headers=headers, timeout=30)


def engine_factory(model_dir):
    def build():
        from loraplex.engine.core.async_engine import AsyncEngine
        from loraplex.engine.core.config import EngineConfig
        from loraplex.engine.core.llm_engine import LLMEngine

        return AsyncEngine(LLMEngine(EngineConfig(model_id=str(model_dir), device="cpu", num_kv_blocks=32,
                                                  served_model_name="tiny")))

    return build


@pytest.fixture(scope="module")
def keyed(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("usage-http")
    keys = root / "keys.json"
    keys.write_text(json.dumps({
        "team-a": {"keys": ["key-team-a"], "weight": 2, "limits": {"requests_per_minute": 100}},
        "team-b": ["key-team-b"],
        "team-c": {"keys": ["key-team-c"]},
    }))
    admin = root / "admin.txt"
    admin.write_text(ADMIN_TOKEN + "\n")
    settings = ServerSettings(api_keys_file=str(keys), admin_token_file=str(admin), usage_log=str(root / "usage.jsonl"))
    with Served(create_app(engine_factory(assets.base), settings)) as served:
        wait_until(lambda: httpx.get(served.url + "/ready").status_code == 200, 120, "the tiny model")
        served.usage_log = root / "usage.jsonl"
        yield served


def stream_usage(served: Served, headers: dict, path: str, body: dict) -> dict:
    """A streamed request with include_usage; returns the usage of its last chunk."""
    last = None
    with httpx.stream("POST", served.url + path, headers=headers, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                last = chunk.get("usage") or last
    return last


def test_usage_totals_equal_the_responses_usage_fields(keyed):
    key = auth("key-team-b")
    usages = [keyed.complete(key, max_tokens=n) for n in (1, 4, 6)]
    usages.append(keyed.complete(key, max_tokens=2, n=3))  # n choices: the prompt counts once
    usages.append(stream_usage(keyed, key, "/v1/completions", {"model": "tiny", "prompt": "Once upon", "max_tokens": 5,
                                                              "temperature": 0}))
    usages.append(stream_usage(keyed, key, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}))
    r = httpx.post(keyed.url + "/generate", headers=key, timeout=60,
                   json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}})
    details = r.json()["details"]
    usages.append({"prompt_tokens": details["prompt_tokens"], "completion_tokens": details["generated_tokens"]})
    mine = keyed.usage(**key).json()["data"][0]
    assert mine["tenant"] == "team-b"
    assert mine["requests"]["success"] == len(usages)
    assert mine["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert mine["completion_tokens"] == sum(u["completion_tokens"] for u in usages)
    # the usage log: one line per request, with its tenant, model and tokens
    wait_until(lambda: keyed.usage_log.exists() and len([
        ln for ln in keyed.usage_log.read_text().splitlines() if '"team-b"' in ln]) >= len(usages), 30, "the usage log")
    lines = [json.loads(ln) for ln in keyed.usage_log.read_text().splitlines()]
    team_b = [rec for rec in lines if rec["tenant"] == "team-b"]
    assert sum(rec["completion_tokens"] for rec in team_b) == mine["completion_tokens"]
    assert {rec["route"] for rec in team_b} == {"/v1/completions", "/v1/chat/completions", "/generate"}
    assert all(rec["adapter"] == "tiny" and rec["outcome"] == "success" and rec["time_to_first_token_seconds"] is not None
               for rec in team_b)
    samples = parse_metrics(httpx.get(keyed.url + "/metrics", headers=auth(ADMIN_TOKEN)).text)
    assert metric(samples, "loraplex_tenant_completion_tokens_total", tenant="team-b") == mine["completion_tokens"]
    assert metric(samples, "loraplex_tenant_requests_total", tenant="team-b", outcome="success") == len(usages)


def test_a_key_reads_its_own_tenant_only(keyed):
    keyed.complete(auth("key-team-a"), max_tokens=2)
    bad = httpx.post(keyed.url + "/v1/completions", headers=auth("key-team-a"), timeout=30,
                     json={"model": "no-such-adapter", "prompt": "x", "max_tokens": 1})
    assert bad.status_code == 404
    a = keyed.usage(**auth("key-team-a"))
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["object"] == "usage" and isinstance(body["since"], int)
    assert [e["tenant"] for e in body["data"]] == ["team-a"]
    entry = body["data"][0]
    assert entry["requests"]["success"] >= 1 and entry["requests"]["client_error"] >= 1
    assert "team-b" not in a.text and "team-c" not in a.text
    c = keyed.usage(**auth("key-team-c")).json()["data"]  # no requests yet: its zeros, nobody else's numbers
    assert c == [{"tenant": "team-c", "requests": {k: 0 for k in ("success", "client_error", "rate_limited",
                                                                  "server_error", "cancelled")},
                  "rate_limited": {"requests": 0, "tokens": 0, "concurrent": 0},
                  "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0}]


def test_the_admin_reads_every_tenant(keyed):
    keyed.complete(auth("key-team-a"), max_tokens=1)
    keyed.complete(auth(ADMIN_TOKEN), max_tokens=1)
    data = {e["tenant"]: e for e in keyed.usage(**auth(ADMIN_TOKEN)).json()["data"]}
    assert {"team-a", "admin"} <= set(data)
    assert data["admin"]["requests"]["success"] >= 1
    mine = keyed.usage(**auth("key-team-a")).json()["data"][0]
    assert data["team-a"] == mine  # the same totals


def test_usage_needs_a_key_when_keys_are_on(keyed):
    assert_error(keyed.usage(), 401, "missing_api_key")
    assert_error(keyed.usage(**auth("not-a-key")), 401, "invalid_api_key")
    # a gateway's header names no tenant when keys are on
    assert_error(keyed.usage(**{GATEWAY_TENANT_HEADER: "team-a"}), 401, "missing_api_key")


def test_the_tenant_weights_are_on_the_apps_registry(keyed):
    samples = parse_metrics(httpx.get(keyed.url + "/metrics", headers=auth(ADMIN_TOKEN)).text)
    assert metric(samples, "loraplex_tenant_weight", tenant="team-a") == 2.0
    assert metric(samples, "loraplex_tenant_weight", tenant="team-c") == 1.0


def test_without_keys_the_caller_is_default_or_the_gateways_tenant(assets):
    with Served(create_app(engine_factory(assets.base), ServerSettings(max_tenants=1))) as open_:
        wait_until(lambda: httpx.get(open_.url + "/ready").status_code == 200, 120, "the tiny model")
        three = open_.complete({}, max_tokens=3)["completion_tokens"]
        four = open_.complete({GATEWAY_TENANT_HEADER: "gw-1"}, max_tokens=4)["completion_tokens"]
        five = open_.complete({GATEWAY_TENANT_HEADER: "gw-2"}, max_tokens=5)["completion_tokens"]  # past --max-tenants=1
        assert open_.usage().json()["data"][0]["tenant"] == "default"
        assert open_.usage(**auth("any-token")).json()["data"][0]["completion_tokens"] == three
        gw = open_.usage(**{GATEWAY_TENANT_HEADER: "gw-1"}).json()["data"]
        assert [(e["tenant"], e["completion_tokens"]) for e in gw] == [("gw-1", four)]
        later = open_.usage(**{GATEWAY_TENANT_HEADER: "gw-3"}).json()["data"]
        assert [(e["tenant"], e["completion_tokens"]) for e in later] == [("other", five)]
        assert_error(open_.usage(**{GATEWAY_TENANT_HEADER: "x" * 200}), 400, "invalid_tenant")
