"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

Off unless an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` / `OTEL_TRACES_EXPORTER=none` do not
turn it off. When on:

- spans go out over OTLP/HTTP (protobuf) through a BatchSpanProcessor; endpoint, headers,
  timeout, sampler (`OTEL_TRACES_SAMPLER`), batching (`OTEL_BSP_*`), `OTEL_SERVICE_NAME` (default
  `loraplex-engine`) and `OTEL_RESOURCE_ATTRIBUTES` are read by the SDK itself;
- the FastAPI instrumentation makes a server span per HTTP request (none per ASGI message),
  continuing the caller's trace from its W3C `traceparent` header (probes and /metrics excluded
  unless `OTEL_PYTHON_FASTAPI_EXCLUDED_URLS` says otherwise);
- when a request's sequences end, `record_sequences` adds, under that server span, one
  `llm_request` span per sequence with `queue`, `adapter_load`, `prefill` and `decode` children.

The step loop never touches a span. The engine keeps a few timestamps on each Sequence anyway
(arrival, adapter wait, first scheduled, first token, finish); the spans are made afterwards in
the HTTP layer with those as explicit start and end times. With tracing off, `record_sequences`
returns at its first line (bench/tracing_overhead.py measures both).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping

from loraplex.manifest import split_revision

log = logging.getLogger("loraplex.engine.api")

DEFAULT_SERVICE_NAME = "loraplex-engine"
# Kubelet probes and Prometheus scrapes would otherwise make most of the spans.
DEFAULT_EXCLUDED_URLS = "/health,/ready,/metrics"

_tracer = None  # an opentelemetry Tracer while tracing is on


def otlp_enabled(env: Mapping[str, str], signal: str) -> bool:
    """Whether the OTEL_* variables turn on OTLP export of `signal` ("traces" or "logs"): an
    endpoint set (its own or the shared one), the SDK not disabled, that signal's exporter not
    `none`."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled_by(env: Mapping[str, str]) -> bool:
    return otlp_enabled(env, "traces")


def _resource(version: str):
    from opentelemetry.sdk.resources import Resource

    attributes = {"service.version": version}
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not named:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    return Resource.create(attributes)


def setup(app, version: str, env: Mapping[str, str] = os.environ):
    """Turn tracing on for this process and instrument `app`, if the environment asks for it.
    Returns the TracerProvider (call `.shutdown()` to flush) or None."""
    global _tracer
    if not enabled_by(env):
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting with http/protobuf", protocol)
    provider = TracerProvider(resource=_resource(version))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    excluded = None if env.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") is not None else DEFAULT_EXCLUDED_URLS
    # No span per ASGI message ("http send" for every streamed token chunk): the request's own
    # spans say where its time went.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=excluded,
                                       exclude_spans=["receive", "send"])
    _tracer = provider.get_tracer("loraplex.engine", version)
    log.info("tracing on: OTLP/HTTP to %s", env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return provider


def shutdown(provider) -> None:
    global _tracer
    if provider is not None:
        _tracer = None
        provider.shutdown()  # flushes what the batch processor holds


def record_sequences(seqs: Iterable, model: str) -> None:
    """Spans for finished (or abandoned) sequences, children of the current span (the HTTP
    request's). `model` is the base model's served name, for sequences without an adapter."""
    if _tracer is None:
        return
    # Sequence timestamps are time.monotonic(); spans want nanoseconds since the epoch.
    offset_ns = time.time_ns() - time.monotonic_ns()
    now = time.monotonic()
    for seq in seqs:
        _record(seq, model, offset_ns, now)


def _record(seq, model: str, offset_ns: int, now: float) -> None:
    from opentelemetry import trace

    def ns(t: float) -> int:
        return offset_ns + int(t * 1e9)

    end = seq.finish_time or now
    scheduled = seq.first_scheduled_time
    first_token = seq.first_token_time
    adapter, revision = split_revision(seq.adapter or "")  # a revision's key `x@2`: adapter x, revision 2
    common = {"gen_ai.request.model": seq.adapter or model, "loraplex.adapter": adapter}
    if revision is not None:
        common["loraplex.adapter_revision"] = revision
    attributes = {
        **common,
        "gen_ai.operation.name": "text_completion",
        "loraplex.request_id": seq.request_id,
        "gen_ai.usage.input_tokens": seq.num_prompt_tokens,
        "gen_ai.usage.output_tokens": len(seq.output_ids),
        "gen_ai.response.finish_reasons": [seq.finish_reason or "abort"],
        "loraplex.preemptions": seq.num_preemptions,
    }
    if seq.error:
        attributes["error.type"] = "engine_error"
    span = _tracer.start_span("llm_request", start_time=ns(seq.arrival_time), attributes=attributes)
    if seq.error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, seq.error))
    ctx = trace.set_span_in_context(span)
    phases = [("queue", seq.arrival_time, scheduled or end)]
    if seq.adapter_wait_time is not None:
        phases.append(("adapter_load", seq.adapter_wait_time, scheduled or end))
    if scheduled is not None:
        phases.append(("prefill", scheduled, first_token or end))
    if first_token is not None:
        phases.append(("decode", first_token, end))
    for name, start, stop in phases:
        child = _tracer.start_span(name, context=ctx, start_time=ns(start), attributes=common)
        if name == "prefill":
            child.set_attribute("gen_ai.usage.input_tokens", seq.num_prompt_tokens)
        elif name == "decode":
            child.set_attribute("gen_ai.usage.output_tokens", len(seq.output_ids))
        child.end(end_time=ns(max(start, stop)))
    span.end(end_time=ns(end))
