"""An OTLP/HTTP trace receiver for tests: a real engine exports its spans to it (OTEL_EXPORTER_OTLP_ENDPOINT)
and the test reads them back. Needs opentelemetry-proto (the engine's tracing extra)."""
from __future__ import annotations

import http.server
import threading

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class OTLPReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest (protobuf).
    Other signals sent to the same endpoint (the usage records go to /v1/logs) are acknowledged
    and not read: their messages are not trace requests."""

    def __init__(self):
        self.spans: list[dict] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.paths.append(self.path)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    outer._add(request, self.headers.get("Content-Type", ""))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _add(self, request, content_type: str) -> None:
        assert content_type == "application/x-protobuf", content_type
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(), "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano, "scope": ss.scope.name, "resource": resource,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "status": s.status.code,
                        })

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def close(self):
        self.httpd.shutdown()


def children_of(spans: list[dict], parent: dict) -> dict[str, dict]:
    return {s["name"]: s for s in spans if s["parent"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]}
