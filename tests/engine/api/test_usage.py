"""Usage metering (usage.py, usage_sinks.py): the Prometheus counters per tenant and adapter and
their caps, the in-memory totals, the rotating JSON-lines log, and OpenTelemetry log records
(in memory, and over OTLP/HTTP to a local collector)."""
from __future__ import annotations

import http.server
import json
import threading

import pytest
from prometheus_client import generate_latest

from loraplex.engine.api.cli import build_parser, configs_from_args
from loraplex.engine.api.metrics import Metrics
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.tenants import TenantLimits, TenantSettings
from loraplex.engine.api.usage import UsageMeter, UsageRecord, create_usage_meter, outcome_for
from loraplex.engine.api.usage_sinks import OTelUsageLogs, UsageLogFile, otel_logs_enabled_by
from tests.engine.api.conftest import metric, parse_metrics

CONFIGURED = {"team-a": TenantSettings(weight=2.0, limits=TenantLimits(requests_per_minute=5)),
              "team-b": TenantSettings()}


def make_meter(max_tenants: int = 100, sinks=(), adapters: int = 100, configured=CONFIGURED) -> UsageMeter:
    metrics = Metrics(lambda: None, adapters)
    metrics.base_label = "base"
    return UsageMeter(metrics.registry, adapter_label=metrics.adapter_label, is_configured=configured.__contains__,
                      tenant_settings=lambda: configured, max_tenants=max_tenants, sinks=sinks)


def scrape(meter: UsageMeter) -> dict:
    return parse_metrics(generate_latest(meter.registry).decode())


def rec(tenant="team-a", status=200, **kw) -> UsageRecord:
    base = dict(request_id="req-1", route="/v1/chat/completions", adapter="a1", prompt_tokens=10,
                cached_prompt_tokens=4, completion_tokens=3, received_at=100.0, started_at=100.5,
                first_token_at=101.25, finished_at=102.0)
    return UsageRecord(tenant=tenant, status=status, **{**base, **kw})


def test_outcomes():
    assert [outcome_for(s) for s in (200, 400, 404, 429, 499, 500, 503)] == [
        "success", "client_error", "client_error", "rate_limited", "cancelled", "server_error", "server_error"]
    with pytest.raises(ValueError, match="outcome must be one of"):
        rec(outcome="ok")
    with pytest.raises(ValueError, match="rate_limit must be one of"):
        rec(status=429, rate_limit="rpm")
    with pytest.raises(ValueError, match="prompt_tokens must be an int >= 0"):
        rec(prompt_tokens=-1)
    with pytest.raises(ValueError, match="needs its tenant"):
        rec(tenant="")


def test_counters_and_totals():
    meter = make_meter()
    meter.record(rec())
    meter.record(rec(completion_tokens=7, adapter="base"))
    meter.record(rec(status=429, rate_limit="tokens", prompt_tokens=0, cached_prompt_tokens=0, completion_tokens=0,
                     first_token_at=None, started_at=None))
    meter.record(rec(tenant="team-b", status=499, adapter=None, completion_tokens=1))
    s = scrape(meter)
    assert metric(s, "loraplex_tenant_requests_total", tenant="team-a", outcome="success") == 2
    assert metric(s, "loraplex_tenant_requests_total", tenant="team-a", outcome="rate_limited") == 1
    assert metric(s, "loraplex_tenant_requests_total", tenant="team-b", outcome="cancelled") == 1
    assert metric(s, "loraplex_tenant_prompt_tokens_total", tenant="team-a") == 20
    assert metric(s, "loraplex_tenant_cached_prompt_tokens_total", tenant="team-a") == 8
    assert metric(s, "loraplex_tenant_completion_tokens_total", tenant="team-a") == 10
    assert metric(s, "loraplex_tenant_rate_limited_total", tenant="team-a", limit="tokens") == 1
    assert metric(s, "loraplex_tenant_time_to_first_token_seconds_count", tenant="team-a") == 2  # successes only
    assert metric(s, "loraplex_tenant_time_to_first_token_seconds_sum", tenant="team-a") == 2.5
    assert metric(s, "loraplex_tenant_weight", tenant="team-a") == 2.0
    assert metric(s, "loraplex_tenant_weight", tenant="team-b") == 1.0
    assert metric(s, "loraplex_adapter_requests_total", adapter="a1", outcome="success") == 1
    assert metric(s, "loraplex_adapter_requests_total", adapter="base", outcome="success") == 1
    assert metric(s, "loraplex_adapter_requests_total", adapter="unknown", outcome="cancelled") == 1
    assert metric(s, "loraplex_adapter_prompt_tokens_total", adapter="a1") == 10
    assert metric(s, "loraplex_adapter_completion_tokens_total", adapter="base") == 7
    a = meter.usage("team-a")
    assert a == {"tenant": "team-a", "requests": {"success": 2, "client_error": 0, "rate_limited": 1,
                                                  "server_error": 0, "cancelled": 0},
                 "rate_limited": {"requests": 0, "tokens": 1, "concurrent": 0},
                 "prompt_tokens": 20, "cached_prompt_tokens": 8, "completion_tokens": 10}
    assert meter.usage("nobody-yet")["requests"]["success"] == 0
    assert [e["tenant"] for e in meter.usage_all()] == ["team-a", "team-b"]


def test_tenant_and_adapter_labels_are_capped():
    meter = make_meter(max_tenants=2, adapters=2)
    for i in range(10):  # gateway-named tenants (not in the keys file) and many adapters
        meter.record(rec(tenant=f"gw-{i}", adapter=f"ad-{i}"))
    for tenant in ("default", "admin", "team-b"):  # never capped: not client-chosen
        meter.record(rec(tenant=tenant))
    s = scrape(meter)
    tenants = {dict(k[1])["tenant"] for k in s if k[0] == "loraplex_tenant_requests_total"}
    assert tenants == {"gw-0", "gw-1", "other", "default", "admin", "team-b"}
    assert metric(s, "loraplex_tenant_requests_total", tenant="other", outcome="success") == 8
    adapters = {dict(k[1])["adapter"] for k in s if k[0] == "loraplex_adapter_requests_total"}
    assert adapters == {"ad-0", "ad-1", "other"}
    assert meter.usage("gw-0")["tenant"] == "gw-0"
    assert meter.usage("gw-9") == {**meter.usage("other"), "tenant": "other"}  # past the cap: the shared bucket
    assert meter.usage("gw-9")["requests"]["success"] == 8
    assert {e["tenant"] for e in meter.usage_all()} == tenants | {"team-a"}  # configured, no requests yet: zeros


def test_a_broken_sink_does_not_fail_the_request():
    class Broken:
        name = "broken"

        def emit(self, record, data):
            raise OSError("disk on fire")

        def close(self):
            raise OSError("still on fire")

    meter = make_meter(sinks=[Broken()])
    meter.record(rec())
    meter.close()
    assert meter.usage("team-a")["requests"]["success"] == 1


def test_jsonl_log_is_written_and_rotated(tmp_path):
    path = tmp_path / "usage.jsonl"
    sink = UsageLogFile(str(path), max_bytes=2000, backups=50)
    meter = make_meter(sinks=[sink])
    for i in range(40):
        meter.record(rec(request_id=f"req-{i}", adapter_digest="sha256:" + "0" * 64))
    meter.close()
    files = sorted(tmp_path.glob("usage.jsonl*"))
    assert len(files) > 2 and all(f.stat().st_size <= 2000 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(int(d["request_id"].split("-")[1]) for d in lines) == list(range(40))
    first = next(d for d in lines if d["request_id"] == "req-0")
    assert first == {"tenant": "team-a", "request_id": "req-0", "route": "/v1/chat/completions", "status": 200,
                     "adapter": "a1", "adapter_digest": "sha256:" + "0" * 64, "adapter_revision": None, "prompt_tokens": 10,
                     "cached_prompt_tokens": 4, "completion_tokens": 3, "received_at": 100.0, "started_at": 100.5,
                     "first_token_at": 101.25, "finished_at": 102.0, "outcome": "success", "rate_limit": None,
                     "queue_seconds": 0.5, "time_to_first_token_seconds": 1.25, "duration_seconds": 2.0}
    def ids(name):
        return [int(json.loads(x)["request_id"].split("-")[1]) for x in (tmp_path / name).read_text().splitlines()]

    assert max(ids("usage.jsonl.1")) < min(ids("usage.jsonl"))  # .1 is the newest backup, the file newer still


def test_a_slow_disk_drops_records_and_counts_them(tmp_path):
    sink = UsageLogFile(str(tmp_path / "u.jsonl"), queue_size=1)
    entered, release = threading.Event(), threading.Event()
    emit = sink._handler.emit

    def stuck(record):  # the writer thread stalls, as on a hung volume
        entered.set()
        release.wait(30)
        emit(record)

    sink._handler.emit = stuck
    meter = make_meter(sinks=[sink])
    meter.record(rec(request_id="r0"))
    assert entered.wait(30)  # r0 is being written
    meter.record(rec(request_id="r1"))  # waits in the queue (size 1)
    meter.record(rec(request_id="r2"))  # no room: dropped, the event loop never waits
    assert sink.dropped == 1
    assert metric(scrape(meter), "loraplex_usage_records_dropped_total", sink="file") == 1
    release.set()
    meter.close()
    ids = [json.loads(x)["request_id"] for x in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert ids == ["r0", "r1"]


def test_usage_log_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--usage-log .*No such file or directory"):
        UsageLogFile(str(tmp_path / "missing-dir" / "u.jsonl"))
    with pytest.raises(ValueError, match="--usage-log-backups must be >= 1"):
        UsageLogFile(str(tmp_path / "u.jsonl"), backups=0)
    args = build_parser().parse_args(["--model-id", "x", "--usage-log", str(tmp_path / "u.jsonl"),
                                      "--usage-log-max-bytes", "1MiB", "--usage-log-backups", "3",
                                      "--max-tenants", "7"])
    _, settings = configs_from_args(args)
    assert (settings.usage_log, settings.usage_log_max_bytes, settings.usage_log_backups, settings.max_tenants) == (
        str(tmp_path / "u.jsonl"), 1 << 20, 3, 7)
    defaults = configs_from_args(build_parser().parse_args(["--model-id", "x"]))[1]
    assert (defaults.usage_log, defaults.usage_log_max_bytes, defaults.usage_log_backups, defaults.max_tenants) == (
        None, 100 << 20, 5, 1000)
    for bad in (["--usage-log-backups", "0"], ["--max-tenants", "0"], ["--usage-log-max-bytes", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model-id", "x", *bad])


def test_otel_log_record_per_request():
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    meter = make_meter(sinks=[OTelUsageLogs(provider, "1.2.3")])
    meter.record(rec(adapter_digest="sha256:" + "1" * 64))
    meter.record(rec(tenant="team-b", status=429, rate_limit="requests", first_token_at=None))
    logs = exporter.get_finished_logs()
    assert len(logs) == 2
    first = logs[0].log_record
    assert first.event_name == "loraplex.usage" and first.timestamp == 102 * 10**9
    attrs = dict(first.attributes)
    assert attrs["loraplex.usage.tenant"] == "team-a" and attrs["loraplex.usage.outcome"] == "success"
    assert attrs["loraplex.usage.adapter_digest"] == "sha256:" + "1" * 64
    assert attrs["gen_ai.usage.input_tokens"] == 10 and attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["loraplex.usage.cached_prompt_tokens"] == 4 and attrs["http.response.status_code"] == 200
    assert attrs["loraplex.usage.time_to_first_token_seconds"] == 1.25
    second = dict(logs[1].log_record.attributes)
    assert second["loraplex.usage.rate_limit"] == "requests" and "loraplex.usage.first_token_at" not in second
    meter.close()


@pytest.mark.parametrize("env,on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:4318/v1/logs"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_LOGS_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_otel_logs_are_configured_by_the_environment(env, on):
    assert otel_logs_enabled_by(env) is on


def test_otlp_export_reaches_a_collector(tmp_path, monkeypatch):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    bodies: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)  # the exporter reads os.environ
        monkeypatch.setenv("OTEL_SERVICE_NAME", "usage-test")
        settings = ServerSettings(usage_log=str(tmp_path / "u.jsonl"), version="9.9.9")
        metrics = Metrics(lambda: None)

        class Auth:
            is_configured = staticmethod(lambda t: False)
            tenants = staticmethod(dict)

        meter = create_usage_meter(settings, metrics, Auth(), env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        assert [s.name for s in meter.sinks] == ["file", "otel"]
        meter.record(rec(tenant="default"))
        meter.close()  # flushes the batch processor
    finally:
        httpd.shutdown()
    assert [p for p, _ in bodies] == ["/v1/logs"]
    req = ExportLogsServiceRequest.FromString(bodies[0][1])
    resource_logs = req.resource_logs[0]
    resource = {a.key: a.value.string_value for a in resource_logs.resource.attributes}
    assert resource["service.name"] == "usage-test" and resource["service.version"] == "9.9.9"
    record = resource_logs.scope_logs[0].log_records[0]
    attrs = {a.key: a.value for a in record.attributes}
    assert record.event_name == "loraplex.usage"
    assert attrs["loraplex.usage.tenant"].string_value == "default"
    assert attrs["gen_ai.usage.input_tokens"].int_value == 10
    assert json.loads((tmp_path / "u.jsonl").read_text())["tenant"] == "default"
