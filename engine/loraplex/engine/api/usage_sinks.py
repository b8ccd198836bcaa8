"""Where usage records go besides Prometheus: a rotating JSON-lines file and OpenTelemetry logs.

Both are fed by `UsageMeter.record` on the event loop, so neither may block it:

- `UsageLogFile` (`--usage-log PATH`): one JSON object per line, written by a thread of its own
  (logging's QueueListener) through a RotatingFileHandler (`--usage-log-max-bytes`, then
  `--usage-log-backups` old files, PATH.1 newest). The queue between them is bounded: when the
  disk cannot keep up, records are dropped and counted (`loraplex_usage_records_dropped_total`)
  rather than held in memory.
- `OTelUsageLogs`: one OpenTelemetry log record per request (event `loraplex.usage`), exported
  over OTLP/HTTP by the SDK's batch processor (its own bounded queue, `OTEL_BLRP_*`). On when an
  endpoint is set (`OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), unless
  `OTEL_SDK_DISABLED=true` or `OTEL_LOGS_EXPORTER=none`, as tracing.py decides for spans.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from logging.handlers import QueueListener, RotatingFileHandler

from loraplex.engine.api.tracing import otlp_enabled

log = logging.getLogger("loraplex.engine.api.usage")

DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 5
QUEUE_SIZE = 10_000  # records waiting for the writer thread (~5 MB at ~500 bytes a line)
EVENT_NAME = "loraplex.usage"


class _Listener(QueueListener):
    def enqueue_sentinel(self) -> None:
        # The stock one uses put_nowait, which fails on a full queue; the writer is draining it.
        self.queue.put(self._sentinel)


class UsageLogFile:
    """JSON lines in a rotating file, written off the event loop; see the module's docstring."""

    name = "file"

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 queue_size: int = QUEUE_SIZE):
        if max_bytes < 1:
            raise ValueError(f"--usage-log-max-bytes must be >= 1, got {max_bytes}")
        if backups < 1:  # RotatingFileHandler never rotates with 0 backups: the file would grow unbounded
            raise ValueError(f"--usage-log-backups must be >= 1, got {backups}")
        self.path = path
        try:
            self._handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--usage-log {path}: {exc}") from None
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler.handleError = self._write_failed  # called by emit() on an OSError
        self._lock = threading.Lock()
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._listener = _Listener(self._queue, self._handler)
        self._listener.start()
        self._closed = False

    def _count_drop(self, why: str) -> None:
        with self._lock:
            self.dropped += 1
            first = self.dropped == 1
        if first:  # once: a full disk would otherwise log once per request
            log.error("usage log %s: dropping records (%s); counted in loraplex_usage_records_dropped_total",
                      self.path, why)

    def _write_failed(self, record: logging.LogRecord) -> None:
        self._count_drop("a write failed")

    def emit(self, record, data: dict) -> None:
        line = json.dumps(data, separators=(",", ":"), ensure_ascii=False)  # escapes newlines: one line
        entry = logging.LogRecord("loraplex.usage", logging.INFO, __file__, 0, line, None, None)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count_drop("the writer fell behind")

    def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._closed:
            return
        self._closed = True
        self._listener.stop()
        self._handler.close()


class OTelUsageLogs:
    """One OpenTelemetry log record per usage record, through `provider` (an SDK LoggerProvider)."""

    name = "otel"

    def __init__(self, provider, version: str = ""):
        self.provider = provider
        self.logger = provider.get_logger("loraplex.engine", version)

    def emit(self, record, data: dict) -> None:
        from opentelemetry._logs import SeverityNumber

        # Attribute values may not be None: an absent field is left out.
        attributes = {f"loraplex.usage.{k}": v for k, v in data.items() if v is not None}
        attributes["http.response.status_code"] = record.status
        attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
        when = record.finished_at if record.finished_at is not None else time.time()
        # The current context (the request's server span, when tracing is on) links it to the trace.
        self.logger.emit(timestamp=int(when * 1e9), severity_number=SeverityNumber.INFO, severity_text="INFO",
                         body=f"{record.tenant} {record.route} {record.status} {record.outcome}",
                         attributes=attributes, event_name=EVENT_NAME)

    def close(self) -> None:
        self.provider.shutdown()  # exports what the batch processor holds


def otel_logs_enabled_by(env: Mapping[str, str]) -> bool:
    return otlp_enabled(env, "logs")


def otel_usage_logs_from_env(version: str, env: Mapping[str, str] = os.environ) -> OTelUsageLogs | None:
    """The OTLP/HTTP usage-record exporter, if the environment asks for one (else None). The
    exporter itself reads the endpoint, headers, timeout and TLS settings (OTEL_EXPORTER_OTLP_*)."""
    if not otel_logs_enabled_by(env):
        return None
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    from loraplex.engine.api.tracing import _resource

    protocol = env.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting usage logs with http/protobuf",
                    protocol)
    # Not the global provider: the app owns it and shuts it down with itself (several apps may
    # live in one test process).
    provider = LoggerProvider(resource=_resource(version), shutdown_on_exit=False)
    provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    log.info("usage records as OpenTelemetry logs: OTLP/HTTP to %s",
             env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return OTelUsageLogs(provider, version)
