"""Usage metering: one `UsageRecord` per finished request, counted per tenant and per adapter.

The request lifecycle builds a record when a request ends, whatever ended it (success, error,
429, disconnect), and calls `meter.record(record)` once. The meter then

- counts it in Prometheus (the app's registry): `loraplex_tenant_*` per tenant,
  `loraplex_adapter_*` per adapter (the adapter label capped as the other metrics' are,
  `--max-adapter-metric-labels`, the rest under `other`);
- adds it to the tenant's in-memory totals, which `GET /v1/usage` reads (since the process
  started: they do not survive a restart; Prometheus or the usage log are the durable record);
- hands it to the sinks (usage_sinks.py): a JSON line in the `--usage-log` file, an
  OpenTelemetry log record when an OTLP logs endpoint is configured.

Bounded: tenants come from the keys file (configuration), plus `default` and `admin`. Without a
keys file, tenants named by an inference gateway's fairness header are client-chosen, so at most
`--max-tenants` of them get their own label and totals; the rest count under `other`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.engine.api.metrics import LATENCY_BUCKETS, OTHER, PREFIX, UNKNOWN
from loraplex.engine.api.quotas import LIMIT_NAMES
from loraplex.engine.api.tenants import ADMIN_TENANT, DEFAULT_TENANT, TenantSettings

log = logging.getLogger("loraplex.engine.api.usage")

OUTCOMES = ("success", "client_error", "rate_limited", "server_error", "cancelled")
CLIENT_GONE = 499  # the status the metrics give a request whose client disconnected


def outcome_for(status: int) -> str:
    """The outcome of an HTTP status: 499 cancelled (client gone), 429 rate_limited (a tenant quota
    or the server's bounded queue), other 4xx client_error, 5xx server_error, else success."""
    if status == CLIENT_GONE:
        return "cancelled"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "success"


def wall_time(monotonic: float | None) -> float | None:
    """A time.monotonic() reading (the engine's Sequence timestamps) as Unix time."""
    return None if monotonic is None else monotonic + (time.time() - time.monotonic())


@dataclass
class UsageRecord:
    """What one finished request used. Times are Unix seconds (None: never reached)."""

    tenant: str
    request_id: str
    route: str  # the HTTP route, e.g. /v1/chat/completions (it names the protocol)
    status: int  # the HTTP status it ended with (499: the client went away)
    adapter: str | None = None  # adapter name; the base model's served name; None: no model resolved
    adapter_digest: str | None = None  # loraplex.manifest.manifest_digest of what served it (a revision's own)
    adapter_revision: int | None = None  # the adapter revision that served it (revisioned adapters only)
    prompt_tokens: int = 0  # each distinct prompt once
    cached_prompt_tokens: int = 0  # of those, found in the prefix cache
    completion_tokens: int = 0  # all choices
    received_at: float | None = None
    started_at: float | None = None  # first scheduled (left the queue)
    first_token_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None  # None: outcome_for(status)
    rate_limit: str | None = None  # requests | tokens | concurrent: the tenant quota that refused it

    def __post_init__(self):
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError("a usage record needs its tenant")
        if self.outcome is None:
            self.outcome = outcome_for(self.status)
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        if self.rate_limit is not None and self.rate_limit not in LIMIT_NAMES:
            raise ValueError(f"rate_limit must be one of {', '.join(LIMIT_NAMES)}, got {self.rate_limit!r}")
        for name in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @staticmethod
    def _span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(max(0.0, end - start), 6)

    def to_dict(self) -> dict:
        """The record with its durations (seconds): what the usage log and OpenTelemetry get."""
        data = asdict(self)
        data["queue_seconds"] = self._span(self.received_at, self.started_at)
        data["time_to_first_token_seconds"] = self._span(self.received_at, self.first_token_at)
        data["duration_seconds"] = self._span(self.received_at, self.finished_at)
        return data


class _Totals:
    __slots__ = ("requests", "rate_limited", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")

    def __init__(self):
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.rate_limited = dict.fromkeys(LIMIT_NAMES, 0)
        self.prompt_tokens = self.cached_prompt_tokens = self.completion_tokens = 0

    def add(self, rec: UsageRecord) -> None:
        self.requests[rec.outcome] += 1
        if rec.rate_limit is not None:
            self.rate_limited[rec.rate_limit] += 1
        self.prompt_tokens += rec.prompt_tokens
        self.cached_prompt_tokens += rec.cached_prompt_tokens
        self.completion_tokens += rec.completion_tokens

    def entry(self, tenant: str) -> dict:
        return {"tenant": tenant, "requests": dict(self.requests), "rate_limited": dict(self.rate_limited),
                "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
                "completion_tokens": self.completion_tokens}


class UsageMeter:
    """Counts usage records; see the module's docstring.

    `adapter_label`: the capped `adapter` label of a name (Metrics.adapter_label); `is_configured`:
    whether the keys file names a tenant (Authenticator.is_configured); `tenant_settings`: the
    configured tenants' settings (Authenticator.tenants), read at scrape time for the weight
    gauge; `sinks`: objects with `emit(record, data)`, `close()` and `name` (and `dropped`, a
    count, if they drop)."""

    def __init__(self, registry, *, adapter_label: Callable[[str | None], str] = lambda n: n or UNKNOWN,
                 is_configured: Callable[[str], bool] = lambda t: False,
                 tenant_settings: Callable[[], Mapping[str, TenantSettings]] = dict,
                 max_tenants: int = 1000, sinks: Iterable = (), clock: Callable[[], float] = time.time):
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be >= 1, got {max_tenants}")
        self.registry = registry
        self.adapter_label = adapter_label
        self.is_configured = is_configured
        self.tenant_settings = tenant_settings
        self.max_tenants = max_tenants
        self.sinks = list(sinks)
        self.since = clock()
        self._lock = threading.Lock()
        self._totals: dict[str, _Totals] = {}
        self._named: set[str] = set()  # tenants named by a gateway that have their own account
        r = registry
        self.tenant_requests = Counter(PREFIX + "tenant_requests", "Finished requests by tenant and outcome",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_prompt_tokens = Counter(PREFIX + "tenant_prompt_tokens", "Prompt tokens by tenant",
                                            ["tenant"], registry=r)
        self.tenant_cached_prompt_tokens = Counter(PREFIX + "tenant_cached_prompt_tokens",
                                                   "Prompt tokens found in the prefix cache, by tenant",
                                                   ["tenant"], registry=r)
        self.tenant_completion_tokens = Counter(PREFIX + "tenant_completion_tokens", "Completion tokens by tenant",
                                                ["tenant"], registry=r)
        self.tenant_rate_limited = Counter(PREFIX + "tenant_rate_limited", "Requests refused by a tenant quota, "
                                           "by the limit hit (requests, tokens, concurrent)", ["tenant", "limit"],
                                           registry=r)
        self.tenant_ttft = Histogram(PREFIX + "tenant_time_to_first_token_seconds", "Arrival to the first token, "
                                     "successful requests, by tenant", ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_prompt_tokens = Counter(PREFIX + "adapter_prompt_tokens", "Prompt tokens by adapter",
                                             ["adapter"], registry=r)
        self.adapter_completion_tokens = Counter(PREFIX + "adapter_completion_tokens", "Completion tokens by adapter",
                                                 ["adapter"], registry=r)
        self.adapter_requests = Counter(PREFIX + "adapter_requests", "Finished requests by adapter and outcome",
                                        ["adapter", "outcome"], registry=r)
        r.register(_MeterCollector(self))

    def account(self, tenant: str, create: bool = True) -> str:
        """The label and totals key of a tenant: itself, or `other` for a gateway-named tenant
        past --max-tenants. `create=False` looks up without taking a place under the cap."""
        with self._lock:
            return self._account(tenant, create)

    def _account(self, tenant: str, create: bool) -> str:
        if tenant in self._totals or tenant in (DEFAULT_TENANT, ADMIN_TENANT) or self.is_configured(tenant):
            return tenant
        if tenant in self._named:
            return tenant
        if len(self._named) < self.max_tenants:
            if create:
                self._named.add(tenant)
            return tenant
        return OTHER

    def record(self, rec: UsageRecord) -> None:
        """Count a finished request (once per request) and hand it to the sinks."""
        with self._lock:
            tenant = self._account(rec.tenant, True)
            self._totals.setdefault(tenant, _Totals()).add(rec)
        self.tenant_requests.labels(tenant, rec.outcome).inc()
        if rec.prompt_tokens:
            self.tenant_prompt_tokens.labels(tenant).inc(rec.prompt_tokens)
        if rec.cached_prompt_tokens:
            self.tenant_cached_prompt_tokens.labels(tenant).inc(rec.cached_prompt_tokens)
        if rec.completion_tokens:
            self.tenant_completion_tokens.labels(tenant).inc(rec.completion_tokens)
        if rec.rate_limit is not None:
            self.tenant_rate_limited.labels(tenant, rec.rate_limit).inc()
        if rec.outcome == "success" and rec.received_at is not None and rec.first_token_at is not None:
            self.tenant_ttft.labels(tenant).observe(max(0.0, rec.first_token_at - rec.received_at))
        adapter = self.adapter_label(rec.adapter)
        self.adapter_requests.labels(adapter, rec.outcome).inc()
        if rec.prompt_tokens:
            self.adapter_prompt_tokens.labels(adapter).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.adapter_completion_tokens.labels(adapter).inc(rec.completion_tokens)
        if self.sinks:
            data = rec.to_dict()
            for sink in self.sinks:
                try:
                    sink.emit(rec, data)
                except Exception:  # a broken sink must not fail the request it records
                    log.exception("usage sink %s failed", getattr(sink, "name", sink))

    def usage(self, tenant: str) -> dict:
        """One tenant's totals, as /v1/usage shows them (zeros before its first request)."""
        with self._lock:
            account = self._account(tenant, False)
            totals = self._totals.get(account)
        return (totals or _Totals()).entry(account)

    def usage_all(self) -> list[dict]:
        """Every tenant's totals (configured tenants without requests included), by name."""
        with self._lock:
            totals = dict(self._totals)
        for tenant in self.tenant_settings():
            totals.setdefault(tenant, None)
        return [(totals[t] or _Totals()).entry(t) for t in sorted(totals)]

    def close(self) -> None:
        """Flush and close the sinks (the app's shutdown)."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing usage sink %s failed", getattr(sink, "name", sink))


class _MeterCollector:
    """Read at scrape time: configured tenants' weights (they follow keys-file reloads) and
    records the sinks had to drop."""

    def __init__(self, meter: UsageMeter):
        self.meter = meter

    def describe(self):
        return []

    def collect(self):
        g = GaugeMetricFamily(PREFIX + "tenant_weight", "Fair-share weight of each configured tenant",
                              labels=["tenant"])
        settings = dict(self.meter.tenant_settings()) or {DEFAULT_TENANT: TenantSettings()}
        for tenant, s in sorted(settings.items()):
            g.add_metric([tenant], s.weight)
        yield g
        counted = [s for s in self.meter.sinks if hasattr(s, "dropped")]
        if counted:
            c = CounterMetricFamily(PREFIX + "usage_records_dropped", "Usage records a sink dropped (its queue was "
                                    "full, or writing failed)", labels=["sink"])
            for sink in counted:
                c.add_metric([sink.name], sink.dropped)
            yield c


def total_tokens(rec: UsageRecord) -> int:
    """What a tenant's tokens-per-minute quota is settled with (quotas.Admission.settle)."""
    return rec.prompt_tokens + rec.completion_tokens


def create_usage_meter(settings, metrics, auth, env: Mapping[str, str] | None = None) -> UsageMeter:
    """The meter of an app: on the app's registry, with the sinks that `settings` (--usage-log)
    and the environment (OTEL_*) ask for. ValueError when the usage log cannot be opened."""
    import os

    from loraplex.engine.api.usage_sinks import UsageLogFile, otel_usage_logs_from_env

    sinks = []
    if settings.usage_log:
        sinks.append(UsageLogFile(settings.usage_log, settings.usage_log_max_bytes, settings.usage_log_backups))
    otel = otel_usage_logs_from_env(settings.version, os.environ if env is None else env)
    if otel is not None:
        sinks.append(otel)
    return UsageMeter(metrics.registry, adapter_label=metrics.adapter_label, is_configured=auth.is_configured,
                      tenant_settings=auth.tenants, max_tenants=settings.max_tenants, sinks=sinks)
