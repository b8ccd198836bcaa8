"""GET /v1/usage through the real app (uvicorn in this process, the tiny model): a key reads its
own tenant's totals and never another's, the admin token reads every tenant's, and without a
keys file the caller's tenant is `default` or the one a gateway names.

The request lifecycle does not feed the meter yet, so the tests record usage through the meter
the app holds (`app.state.usage_meter`), as the lifecycle will.
"""
from __future__ import annotations

import json
import threading

import httpx
import pytest
import uvicorn

from loraplex.engine.api.app import create_app
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.tenants import GATEWAY_TENANT_HEADER
from loraplex.engine.api.usage import UsageRecord
from tests.engine.api.conftest import assert_error, auth, free_port, metric, parse_metrics, wait_until

ADMIN_TOKEN = "usage-admin-token"


class Served:
    def __init__(self, app):
        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "uvicorn to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def record(self, tenant: str, **kw) -> None:
        fields = dict(request_id="r", route="/v1/completions", status=200, adapter="tiny", prompt_tokens=5,
                      cached_prompt_tokens=0, completion_tokens=2)
        self.app.state.usage_meter.record(UsageRecord(tenant=tenant, **{**fields, **kw}))

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
    settings = ServerSettings(api_keys_file=str(keys), admin_token_file=str(admin))
    with Served(create_app(engine_factory(assets.base), settings)) as served:
        yield served


def test_a_key_reads_its_own_tenant_only(keyed):
    keyed.record("team-a", completion_tokens=7)
    keyed.record("team-a", status=429, rate_limit="requests", prompt_tokens=0, completion_tokens=0)
    keyed.record("team-b", prompt_tokens=1000, cached_prompt_tokens=600)
    a = keyed.usage(**auth("key-team-a"))
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["object"] == "usage" and isinstance(body["since"], int)
    assert [e["tenant"] for e in body["data"]] == ["team-a"]
    entry = body["data"][0]
    assert entry["requests"]["success"] >= 1 and entry["requests"]["rate_limited"] >= 1
    assert entry["rate_limited"]["requests"] >= 1
    assert entry["completion_tokens"] >= 7
    b = keyed.usage(**auth("key-team-b")).json()["data"]
    assert [e["tenant"] for e in b] == ["team-b"] and b[0]["cached_prompt_tokens"] >= 600
    assert "team-a" not in json.dumps(b)
    c = keyed.usage(**auth("key-team-c")).json()["data"]  # no requests yet: its zeros, nobody else's numbers
    assert c == [{"tenant": "team-c", "requests": {k: 0 for k in ("success", "client_error", "rate_limited",
                                                                  "server_error", "cancelled")},
                  "rate_limited": {"requests": 0, "tokens": 0, "concurrent": 0},
                  "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0}]


def test_the_admin_reads_every_tenant(keyed):
    keyed.record("team-b")
    keyed.record("admin", completion_tokens=1)
    data = {e["tenant"]: e for e in keyed.usage(**auth(ADMIN_TOKEN)).json()["data"]}
    assert {"team-a", "team-b", "team-c", "admin"} <= set(data)
    assert data["team-b"]["requests"]["success"] >= 1
    mine = keyed.usage(**auth("key-team-b")).json()["data"][0]
    assert data["team-b"] == mine  # the same totals


def test_usage_needs_a_key_when_keys_are_on(keyed):
    assert_error(keyed.usage(), 401, "missing_api_key")
    assert_error(keyed.usage(**auth("not-a-key")), 401, "invalid_api_key")
    # a gateway's header names no tenant when keys are on
    assert_error(keyed.usage(**{GATEWAY_TENANT_HEADER: "team-a"}), 401, "missing_api_key")


def test_the_tenant_metrics_are_on_the_apps_registry(keyed):
    keyed.record("team-c", completion_tokens=11)
    wait_until(lambda: httpx.get(keyed.url + "/ready").status_code == 200, 120, "the tiny model")
    samples = parse_metrics(httpx.get(keyed.url + "/metrics", headers=auth(ADMIN_TOKEN)).text)
    assert metric(samples, "loraplex_tenant_completion_tokens_total", tenant="team-c") >= 11
    assert metric(samples, "loraplex_tenant_weight", tenant="team-a") == 2.0
    assert metric(samples, "loraplex_tenant_weight", tenant="team-c") == 1.0


def test_without_keys_the_caller_is_default_or_the_gateways_tenant(assets):
    with Served(create_app(engine_factory(assets.base), ServerSettings(max_tenants=1))) as open_:
        open_.record("default", completion_tokens=3)
        open_.record("gw-1", completion_tokens=4)
        open_.record("gw-2", completion_tokens=5)  # past --max-tenants=1: under `other`
        assert open_.usage().json()["data"][0]["tenant"] == "default"
        assert open_.usage(**auth("any-token")).json()["data"][0]["completion_tokens"] == 3
        gw = open_.usage(**{GATEWAY_TENANT_HEADER: "gw-1"}).json()["data"]
        assert [(e["tenant"], e["completion_tokens"]) for e in gw] == [("gw-1", 4)]
        later = open_.usage(**{GATEWAY_TENANT_HEADER: "gw-3"}).json()["data"]
        assert [(e["tenant"], e["completion_tokens"]) for e in later] == [("other", 5)]
        assert_error(open_.usage(**{GATEWAY_TENANT_HEADER: "x" * 200}), 400, "invalid_tenant")
