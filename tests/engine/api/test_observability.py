"""Observability of a real `loraplex-engine` process: OpenTelemetry traces exported over OTLP/HTTP
to a receiver inside the test, and the metric names the Helm chart's dashboard and alerts query.

The engine runs with OTEL_EXPORTER_OTLP_ENDPOINT pointing at the receiver; three requests on an
adapter that is registered but not loaded (OpenAI completion with a caller's `traceparent`,
streamed chat completion, LoRAX /generate) must each come back as a server span with an
`llm_request` child and its queue / adapter_load / prefill / decode phases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import engine_process, parse_metrics, wait_until, write_manifest_file

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed (engine extra)")
from .otlp_receiver import children_of  # noqa: E402

pytestmark = pytest.mark.slow

ADAPTER = "a2"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"



@pytest.fixture(scope="module")
def traced_engine(assets, receiver, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("otel")
    manifest = tmp / "manifest.json"
    write_manifest_file(manifest, [{"name": ADAPTER, "source": "local", "uri": ADAPTER}])
    with engine_process("traced", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-kv-blocks", "128",
        "--served-model-name", "tiny-base", "--num-threads", "1",
        "--adapter-dir", str(assets.adapter_dir), "--adapter-manifest-file", str(manifest),
    ], tmp / "engine.log", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon after the spans end
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OMP_NUM_THREADS": "1",
    }) as engine:
        yield engine


def test_requests_on_an_adapter_are_traced(traced_engine, receiver):
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    with httpx.Client(base_url=traced_engine.url, timeout=60) as c:
        # 1. the adapter is only registered: this request waits for its load
        r1 = c.post("/v1/completions", headers={"traceparent": traceparent},
                    json={"model": ADAPTER, "prompt": "hello there", "max_tokens": 5})
        assert r1.status_code == 200, r1.text
        # 2. streamed chat
        with c.stream("POST", "/v1/chat/completions", json={
                "model": ADAPTER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": True, "stream_options": {"include_usage": True}}) as r2:
            assert r2.status_code == 200
            events = [json.loads(line[6:]) for line in r2.iter_lines() if line.startswith("data: {")]
        # 3. LoRAX
        r3 = c.post("/generate", json={"inputs": "one two", "parameters": {"adapter_id": ADAPTER, "max_new_tokens": 3,
                                                                            "details": True}})
        assert r3.status_code == 200, r3.text
        assert c.get("/ready").status_code == 200

    def requests_exported():
        spans = receiver.snapshot()
        return spans if len([s for s in spans if s["name"] == "llm_request"]) >= 3 else None

    spans = wait_until(requests_exported, 30, "three llm_request spans at the receiver", interval=0.1)
    # Spans on the traces path; the usage records may reach /v1/logs of the same endpoint meanwhile.
    assert "/v1/traces" in receiver.paths and set(receiver.paths) <= {"/v1/traces", "/v1/logs"}
    llm = sorted([s for s in spans if s["name"] == "llm_request"], key=lambda s: s["start"])
    assert len(llm) == 3, [s["name"] for s in spans]
    servers = {s["span_id"]: s for s in spans if s["attributes"].get("http.route") or s["name"].startswith("POST ")}

    usage1 = r1.json()["usage"]
    usage2 = [e for e in events if e.get("usage")][-1]["usage"]
    details3 = r3.json()["details"]
    expected = [(usage1["prompt_tokens"], usage1["completion_tokens"], r1.json()["choices"][0]["finish_reason"], "/v1/completions"),
                (usage2["prompt_tokens"], usage2["completion_tokens"],
                 [e for e in events if e["choices"] and e["choices"][0].get("finish_reason")][-1]["choices"][0]["finish_reason"],
                 "/v1/chat/completions"),
                (None, details3["generated_tokens"], details3["finish_reason"], "/generate")]
    for span, (prompt_tokens, completion_tokens, finish, route) in zip(llm, expected):
        a = span["attributes"]
        assert a["gen_ai.request.model"] == ADAPTER and a["loraplex.adapter"] == ADAPTER
        assert a["gen_ai.usage.output_tokens"] == completion_tokens
        if prompt_tokens is not None:
            assert a["gen_ai.usage.input_tokens"] == prompt_tokens
        assert a["gen_ai.usage.input_tokens"] > 0
        lorax_finish = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
        assert a["gen_ai.response.finish_reasons"] == [lorax_finish.get(finish, finish)]
        assert span["resource"]["service.name"] == "loraplex-engine"
        assert span["resource"]["deployment.environment"] == "test"
        # Its parent is the HTTP server span of its route (FastAPI instrumentation).
        server = servers[span["parent"]]
        assert server["attributes"].get("http.route") == route, server
        # The phases tile the request: queue, then prefill, then decode.
        phases = children_of(spans, span)
        assert {"queue", "prefill", "decode"} <= set(phases), phases.keys()
        assert phases["queue"]["start"] == span["start"]
        assert phases["queue"]["end"] == phases["prefill"]["start"] <= phases["prefill"]["end"]
        assert phases["prefill"]["end"] == phases["decode"]["start"] <= phases["decode"]["end"] == span["end"]
        assert phases["prefill"]["attributes"]["gen_ai.usage.input_tokens"] == a["gen_ai.usage.input_tokens"]
        assert phases["decode"]["attributes"]["gen_ai.usage.output_tokens"] == completion_tokens
        assert all(p["attributes"]["loraplex.adapter"] == ADAPTER for p in phases.values())

    first, second, third = llm
    # The first request waited for the adapter's load; later ones found it on the device.
    load = children_of(spans, first).get("adapter_load")
    assert load is not None, "the first request on a registered adapter waits for its load"
    assert first["start"] <= load["start"] <= load["end"] == children_of(spans, first)["prefill"]["start"]
    assert "adapter_load" not in children_of(spans, second) and "adapter_load" not in children_of(spans, third)
    # W3C trace context: the first request continues the caller's trace under the caller's span.
    assert first["trace_id"] == TRACE_ID
    assert servers[first["parent"]]["parent"] == PARENT_SPAN_ID
    assert second["trace_id"] != TRACE_ID and third["trace_id"] != second["trace_id"]
    # Probes and scrapes make no spans.
    assert not [s for s in spans if "/ready" in s["name"] or "/health" in s["name"] or "/metrics" in s["name"]]


# --- the chart's dashboard and alerts query only metrics that exist -------------------------------

TENANT_SERIES = {"loraplex_tenant_completion_tokens_total", "loraplex_tenant_prompt_tokens_total",
                 "loraplex_tenant_time_to_first_token_seconds_bucket", "loraplex_tenant_rate_limited_total",
                 "loraplex_tenant_requests_total", "loraplex_tenant_requests_waiting",
                 "loraplex_tenant_requests_running", "loraplex_tenant_weight"}


def test_dashboard_and_alerts_query_exported_metrics(traced_engine):
    """The engine's side: every non-operator series the dashboard and the alerts query is in a
    live engine's /metrics (the operator's are checked against a live operator in
    tests/operator/test_integration.py)."""
    from tests.operator.test_deploy_files import ALL_ON, promql_of, render
    from tests.support.promql import PROMETHEUS_OWN, exported_names, queried_names

    text = httpx.get(traced_engine.url + "/metrics", timeout=10).text
    assert parse_metrics(text)  # a real scrape
    engine_names = exported_names(text)
    exprs = promql_of(render(ALL_ON))
    assert len(exprs) > 20
    queried = set().union(*(queried_names(e) for e in exprs))
    # The per-tenant series (issue 22) come from the engine's tenancy work. An engine that
    # exports none of them yet is checked against the names the issue fixes; one that exports
    # any is checked against its own /metrics like every other series.
    if not any(n.startswith("loraplex_tenant_") for n in engine_names):
        engine_names |= TENANT_SERIES
    assert TENANT_SERIES <= queried, sorted(TENANT_SERIES - queried)
    assert {"loraplex_requests_total", "loraplex_time_to_first_token_seconds_bucket", "loraplex_kv_cache_usage_ratio",
            "loraplex_adapters", "loraplex_adapter_evictions_total", "loraplex_operator_adapters", "up"} <= queried
    unknown = {q for q in queried if not q.startswith("loraplex_operator_")} - engine_names - PROMETHEUS_OWN
    assert not unknown, f"the dashboard or alerts query metrics the engine does not export: {sorted(unknown)}"
    # The check has teeth: a misspelt name is caught.
    assert queried_names('sum(rate(loraplex_request_total{adapter="x"}[5m]))') - engine_names == {"loraplex_request_total"}
    with pytest.raises(ValueError, match="not valid PromQL"):
        queried_names("sum(rate(loraplex_requests_total[5m])")
    dashboard = json.loads((Path(__file__).resolve().parents[3] / "charts/loraplex/dashboards/loraplex.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("requests", "tokens", "time to first token", "latency", "queue", "kv cache", "tier",
                  "loads", "evictions", "replicas"):
        assert topic in titles, topic


def test_tracing_off_loads_nothing_of_opentelemetry():
    """Without an OTLP endpoint, serving never imports the OpenTelemetry SDK, exporter or
    instrumentation, and the per-request hook returns before touching a sequence."""
    code = ("import sys\n"
            "from fastapi import FastAPI\n"
            "from loraplex.engine.api import app, lifecycle, tracing\n"
            "assert tracing.setup(FastAPI(), 'v', env={'OTEL_SERVICE_NAME': 'x'}) is None\n"
            "tracing.record_sequences([object()], 'base')  # an object() would fail any attribute read\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter',"
            " 'opentelemetry.instrumentation'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    from loraplex.engine.api.tracing import enabled_by

    assert enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert enabled_by({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not enabled_by({})
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not enabled_by({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
