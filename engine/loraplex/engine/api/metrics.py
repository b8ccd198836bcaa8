"""Prometheus metrics (prefix `loraplex_`), one registry per app.

Request metrics are observed by the routes. Engine and adapter state is read at scrape time by
a collector: `LLMEngine.stats()` (lengths of the scheduler's queues and the block free list:
plain reads, no mutation), `Scheduler.tenant_stats()` (per tenant with work: queue counts and
virtual counter, read from a copy) and the adapter manager's counters under its lock. Adapter load
durations are drained from the manager into a histogram at each scrape.

Beside them, the model-server metrics that inference-gateway endpoint pickers scrape (the
Gateway API Inference Extension's model server protocol, with vLLM's names), and what the
adapter tiers hold (`loraplex_adapter_resident`, capped; `loraplex_lora_resident_info` in vLLM's
label format): see `_router_metrics`, `_residency` and docs/api.md "Router metrics".
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.manifest import MAX_SERVED_REVISIONS, AdapterState

PREFIX = "loraplex_"
OTHER = "other"  # per-adapter label beyond the cap
UNKNOWN = "unknown"  # the request named no servable model (404, 401, malformed body)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    def __init__(self, engine_getter: Callable, max_resident: int = 256, warm_start_getter: Callable | None = None):
        self.engine_getter = engine_getter
        self.max_resident = max_resident
        self.warm_start_getter = warm_start_getter or (lambda: None)

    def describe(self):
        return []

    def collect(self):
        async_engine = self.engine_getter()
        stats = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_ratio": 0.0}
        tiers = {s.value: 0 for s in AdapterState}
        loads: dict = {}
        evictions: dict = {}
        tier_bytes: dict = {}
        lookups, negative = 0, 0
        adapter_waits = {"load": 0, "slot": 0}
        catalog: dict[str, int] | None = None
        tenants: dict[str, dict] = {}
        if async_engine is not None:
            engine = async_engine
            stats.update(engine.stats())
            tenants = engine.tenant_stats()
            mgr = engine.adapters
            tiers = mgr.tier_counts()
            tier_bytes = mgr.tier_bytes()
            adapter_waits = mgr.waiting_counts()
            with mgr.lock:
                loads = dict(mgr.counters.loads)
                evictions = dict(mgr.counters.evictions)
            lookups, negative = mgr.resolver.lookups, len(mgr.resolver.negative)
            if mgr.catalog is not None:
                catalog = mgr.catalog.counts()
            yield from _router_metrics(engine, stats)
            yield from _residency(mgr, self.max_resident)
        warm = self.warm_start_getter()
        view = warm.view() if warm is not None else None
        if view is not None and view["seconds"] is not None:  # only where a warm start ran (or runs)
            yield GaugeMetricFamily(PREFIX + "warm_start_seconds", "Seconds the warm start took (so far, while it "
                                    "runs): from the model being up to all placed adapters resident or the budget "
                                    "spent", value=view["seconds"])
            g = GaugeMetricFamily(PREFIX + "warm_start_adapters", "Adapters the warm start was given (listed) "
                                  "and of those resident", labels=["state"])
            g.add_metric(["listed"], view["listed"])
            g.add_metric(["resident"], view["resident"])
            yield g
            yield GaugeMetricFamily(PREFIX + "warm_start_timed_out", "1 when the warm start's budget was spent "
                                    "before every placed adapter was resident", value=int(view["timed_out"]))
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Sequences in the running batch",
                                value=stats["num_requests_running"])
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Sequences queued, not yet running",
                                value=stats["num_requests_waiting"])
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "Share of KV cache blocks in use (0..1)",
                                value=stats["kv_cache_usage_ratio"])
        # Per tenant with work (the scheduler keeps no state for idle tenants, so the label set is
        # bounded by the queue and the batch): docs/engine.md "Fairness across tenants".
        families = [
            (GaugeMetricFamily(PREFIX + "tenant_requests_waiting", "Sequences of the tenant queued, not yet running",
                               labels=["tenant"]), "waiting"),
            (GaugeMetricFamily(PREFIX + "tenant_requests_running", "Sequences of the tenant in the running batch",
                               labels=["tenant"]), "running"),
            (GaugeMetricFamily(PREFIX + "tenant_virtual_service", "The tenant's virtual token counter: service "
                               "received / weight (prompt token 1, output token 2), lifted on return from idle",
                               labels=["tenant"]), "virtual_service"),
        ]
        for family, key in families:
            for tenant, row in sorted(tenants.items()):
                family.add_metric([tenant], row[key])
            yield family
        g = GaugeMetricFamily(PREFIX + "num_requests_waiting_for_adapter", "Queued sequences whose adapter is not "
                              "on the device yet, by reason: load (not loaded yet), slot (loaded, no free slot)",
                              labels=["reason"])
        for reason, n in sorted(adapter_waits.items()):
            g.add_metric([reason], n)
        yield g
        g = GaugeMetricFamily(PREFIX + "adapters", "Registered adapters by tier (state)", labels=["tier"])
        for tier, n in sorted(tiers.items()):
            g.add_metric([tier], n)
        yield g
        c = CounterMetricFamily(PREFIX + "adapter_loads", "Adapter loads by tier and result",
                                labels=["tier", "result"])
        for (tier, result), n in sorted(loads.items()):
            c.add_metric([tier, result], n)
        yield c
        c = CounterMetricFamily(PREFIX + "adapter_evictions", "Adapter evictions by tier evicted from",
                                labels=["tier"])
        for tier, n in sorted(evictions.items()):
            c.add_metric([tier], n)
        yield c
        # Prefix cache, in prompt tokens: looked up at admission, and found in cached KV blocks.
        # The vllm:* twins are what routers and vLLM dashboards read.
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        for prefix in (PREFIX, "vllm:"):
            yield CounterMetricFamily(prefix + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=queries)
            yield CounterMetricFamily(prefix + "prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                      value=hits)
        used = GaugeMetricFamily(PREFIX + "adapter_bytes", "Bytes held by each adapter cache tier", labels=["tier"])
        budget = GaugeMetricFamily(PREFIX + "adapter_budget_bytes", "Byte budget of each adapter cache tier "
                                   "(absent: unbounded)", labels=["tier"])
        for tier, (n, cap) in sorted(tier_bytes.items()):
            used.add_metric([tier], n)
            if cap is not None:
                budget.add_metric([tier], cap)
        yield used
        yield budget
        yield CounterMetricFamily(PREFIX + "adapter_name_lookups", "Unregistered adapter names looked up in the "
                                  "default source or the catalog (negative-cache hits excluded)", value=lookups)
        yield GaugeMetricFamily(PREFIX + "adapter_negative_cache_entries", "Names remembered as unknown or invalid",
                                value=negative)
        if catalog is not None:  # only on an engine with --adapter-catalog-url
            c = CounterMetricFamily(PREFIX + "adapter_catalog_requests", "Unregistered adapter names looked up in "
                                    "the operator's catalog, by result (ok, not_found, refused, unavailable)",
                                    labels=["result"])
            for result in ("ok", "not_found", "refused", "unavailable"):
                c.add_metric([result], catalog.get(result, 0))
            yield c


def _router_metrics(engine, stats: dict):
    """vLLM's names and semantics, as the Gateway API Inference Extension's endpoint picker reads
    them: queue length, running batch, KV usage in 0..1, and the LoRA info gauge whose *value*
    is the time of this report and whose labels carry the adapters (comma-separated names)."""
    labels = ["model_name"]
    model = engine.served_model_name
    for name, help_, key in (("num_requests_running", "Number of requests in model execution batches", "num_requests_running"),
                             ("num_requests_waiting", "Number of requests waiting to be processed", "num_requests_waiting"),
                             ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage", "kv_cache_usage_ratio")):
        g = GaugeMetricFamily("vllm:" + name, help_, labels=labels)
        g.add_metric([model], stats[key])
        yield g
    running, waiting = engine.adapters.router_view()
    g = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests",
                          labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    g.add_metric([str(engine.adapters.num_slots), ",".join(running), ",".join(waiting)], time.time())
    yield g


def _residency(mgr, cap: int):
    """Which adapters each tier holds, for endpoint pickers that route by residency (vLLM's
    lora_requests_info names adapters in flight, not resident): one series per adapter in a
    device slot or the host tier, at most `cap` (the most recently used), the rest counted; and
    the device tier in vLLM's label format, for an EPP pointed at it (docs/api.md)."""
    rows, left_out = mgr.residency(cap)
    g = GaugeMetricFamily(PREFIX + "adapter_resident", "1 for each adapter held in a tier (device: a slot; host: "
                          "RAM), the most recently used first, capped by --max-residency-metric-adapters",
                          labels=["adapter", "tier"])
    for name, tier in rows:
        g.add_metric([name, tier], 1)
    yield g
    yield GaugeMetricFamily(PREFIX + "adapter_resident_truncated", "Resident adapters left out of "
                            "loraplex_adapter_resident by its cap", value=left_out)
    _, waiting = mgr.router_view()
    on_device = mgr.on_device()
    g = GaugeMetricFamily(PREFIX + "lora_resident_info", "vllm:lora_requests_info's labels with running_lora_adapters "
                          "= the adapters in device slots (resident, whether or not a request runs on them)",
                          labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    g.add_metric([str(mgr.num_slots), ",".join(on_device), ",".join(waiting)], time.time())
    yield g


class Metrics:
    def __init__(self, engine_getter: Callable, max_adapter_labels: int = 100, max_resident: int = 256,
                 warm_start_getter: Callable | None = None):
        disable_created_metrics()  # no *_created series: they double the output and nothing reads them
        self.engine_getter = engine_getter
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self.base_label: str | None = None
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(PREFIX + "requests", "Requests by model (adapter or base) and status",
                                ["adapter", "status"], registry=r)
        self.request_duration = Histogram(PREFIX + "request_duration_seconds", "Request latency, arrival to last token",
                                          ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to the first generated token",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time between output tokens of a request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", ["adapter"], registry=r)
        # Per revision of a revisioned adapter (rollout analysis compares them). `adapter` is capped
        # as above; per adapter the MAX_SERVED_REVISIONS newest revisions seen keep their series.
        self.revision_requests = Counter(PREFIX + "revision_requests", "Requests of a revisioned adapter by revision "
                                         "and status", ["adapter", "revision", "status"], registry=r)
        self.revision_ttft = Histogram(PREFIX + "revision_time_to_first_token_seconds", "Arrival to the first "
                                       "generated token, successful requests of a revisioned adapter, by revision",
                                       ["adapter", "revision"], buckets=LATENCY_BUCKETS, registry=r)
        self._revision_series: dict[str, OrderedDict[int, set[str]]] = {}  # adapter -> revision -> statuses
        self.adapter_load_seconds = Histogram(PREFIX + "adapter_load_seconds", "Adapter fetch + parse time",
                                              buckets=LOAD_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_getter, max_resident, warm_start_getter))

    def adapter_label(self, name: str | None) -> str:
        """The `adapter` label for a model name, cardinality-capped. The base keeps its name."""
        if name is None:
            return UNKNOWN
        if name == self.base_label or name in self._labels:
            return name
        if len(self._labels) < self.max_adapter_labels:
            self._labels.add(name)
            return name
        return OTHER

    def observe_revision(self, adapter: str, revision: int, status: str, ttft: float | None) -> None:
        """One request of revision `revision` of `adapter` (a label from adapter_label, never
        over the cap). Past MAX_SERVED_REVISIONS revisions of one adapter, the oldest's series go:
        a manifest serves at most that many at once, so only retired revisions lose theirs."""
        if adapter in (OTHER, UNKNOWN):
            return
        seen = self._revision_series.setdefault(adapter, OrderedDict())
        if revision not in seen:
            if len(seen) >= MAX_SERVED_REVISIONS and revision < min(seen):
                return  # older than every revision kept: not recorded
            seen[revision] = set()
            if len(seen) > MAX_SERVED_REVISIONS:
                old = min(seen)
                for code in seen.pop(old):
                    self.revision_requests.remove(adapter, str(old), code)
                try:
                    self.revision_ttft.remove(adapter, str(old))
                except KeyError:  # it never answered 200
                    pass
        seen[revision].add(status)
        self.revision_requests.labels(adapter, str(revision), status).inc()
        if status == "200" and ttft is not None:
            self.revision_ttft.labels(adapter, str(revision)).observe(ttft)

    def drain_adapter_loads(self) -> None:
        async_engine = self.engine_getter()
        if async_engine is None:
            return
        mgr = async_engine.adapters
        with mgr.lock:
            seconds = list(mgr.counters.load_seconds)
            mgr.counters.load_seconds.clear()
        for s in seconds:
            self.adapter_load_seconds.observe(s)

    def render(self, view: Callable | None = None) -> bytes:
        """The exposition text; `view` wraps the registry first (redaction.RedactedRegistry)."""
        self.drain_adapter_loads()
        return generate_latest(self.registry if view is None else view(self.registry))


class RequestTimer:
    """Per-request observations; `finish` records everything once, whatever path ends the request."""

    def __init__(self, metrics: Metrics, label: str):
        self.metrics = metrics
        self.label = label
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.revision: int | None = None  # the revision of a revisioned adapter serving it
        self.done = False

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now

    def finish(self, status: int | str) -> None:
        if self.done:
            return
        self.done = True
        m, label = self.metrics, self.label
        m.requests.labels(label, str(status)).inc()
        if self.revision is not None:
            ttft = None if self.first_token is None else self.first_token - self.start
            m.observe_revision(label, self.revision, str(status), ttft)
        if self.prompt_tokens:
            m.prompt_tokens.labels(label).inc(self.prompt_tokens)
        if self.completion_tokens:
            m.generation_tokens.labels(label).inc(self.completion_tokens)
        if str(status) == "200":
            m.request_duration.labels(label).observe(time.perf_counter() - self.start)
            if self.first_token is not None:
                m.ttft.labels(label).observe(self.first_token - self.start)
                if self.completion_tokens > 1 and self.last_token is not None:
                    m.tpot.observe((self.last_token - self.first_token) / (self.completion_tokens - 1))
