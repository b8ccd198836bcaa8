"""The operator's own Prometheus metrics, served on LORAPLEX_METRICS_PORT (9090) at /metrics.

Names agreed with the Helm chart's dashboards and alerts:
loraplex_operator_reconcile_total{kind,result}, loraplex_operator_reconcile_duration_seconds{kind},
loraplex_operator_adapters{phase}, loraplex_operator_adapter_pushes_total{result},
loraplex_operator_autoscaler_decisions_total{direction}.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("loraplex.operator")

RECONCILES = Counter("loraplex_operator_reconcile_total", "Reconcile passes, by kind and result",
                     ["kind", "result"])
RECONCILE_SECONDS = Histogram("loraplex_operator_reconcile_duration_seconds", "Duration of one reconcile pass",
                              ["kind"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
ADAPTERS = Gauge("loraplex_operator_adapters", "LoraAdapters by phase (over every base this operator leads)",
                 ["phase"])
PUSHES = Counter("loraplex_operator_adapter_pushes_total", "Adapter manifest pushes to engine pods, by result",
                 ["result"])
AUTOSCALER = Counter("loraplex_operator_autoscaler_decisions_total", "Autoscaler decisions that changed replicas",
                     ["direction"])
ENGINE_CALLS = Gauge("loraplex_operator_engine_calls_last_pass", "Engine HTTP calls of the last pass over a base "
                     "(a settled base costs one adapter listing per pod)", ["namespace", "base"])
PHASES = ("Pending", "Loading", "Ready", "Degraded", "Failed")


def set_adapter_phases(per_base: Mapping[object, Mapping[str, int]]) -> None:
    totals = {p: 0 for p in PHASES}
    for counts in per_base.values():
        for phase, n in counts.items():
            totals[phase] = totals.get(phase, 0) + n
    for phase, n in totals.items():
        ADAPTERS.labels(phase=phase).set(n)


def serve() -> int | None:
    """Start the /metrics endpoint (once per process); the port, or None when disabled (0)."""
    port = int(os.environ.get("LORAPLEX_METRICS_PORT", "9090") or 0)
    if port <= 0:
        return None
    addr = os.environ.get("LORAPLEX_METRICS_ADDR", "0.0.0.0")
    start_http_server(port, addr=addr, registry=REGISTRY)
    log.info("operator metrics on http://%s:%d/metrics", addr, port)
    return port
