"""The revisions' health, for the rollout analysis (rollout.py): each revisioned adapter's request,
error and time-to-first-token counters per revision, from the engines' own metrics.

Every engine counts, for the adapters it serves by revisions,
  loraplex_revision_requests_total{adapter, revision, status}     (status: the HTTP status code)
  loraplex_revision_time_to_first_token_seconds_{sum,count}{adapter, revision}   (status 200 only)
The base's timer (scaling.observe_base) reads every Ready pod's /metrics once per interval; this
module parses those series and keeps, per base, the last counters of each Ready pod. A rollout's
numbers are these cumulative counters summed over the Ready pods (`revision_health`); it keeps
its own baseline at a step's start and analyses the increase.

Errors are the requests answered 5xx or 424 (adapter_failed): the canary's fault. A client's 4xx
(400, 404, 429) is not. Bounded: an engine labels at most --max-adapter-metric-labels adapters
(the rest are `other`, never a revision's), a manifest serves at most 16 revisions, and the
pods that are no longer Ready are forgotten at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .constants import Key
from .demand import OTHER_LABELS
from .traffic import RevisionHealth

REQUESTS = "loraplex_revision_requests_total"
TTFT_SUM = "loraplex_revision_time_to_first_token_seconds_sum"
TTFT_COUNT = "loraplex_revision_time_to_first_token_seconds_count"
MAX_SERIES_PER_POD = 10_000  # (adapter, revision) pairs kept of one pod: far above what an engine labels

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

PodCounters = dict  # adapter -> revision -> RevisionHealth (one pod's cumulative counters)


def is_error(status: str) -> bool:
    """The statuses a rollout counts against the revision that answered."""
    return status.startswith("5") or status == "424"


def parse(text: str) -> PodCounters:
    """adapter -> revision -> its counters, from one pod's Prometheus text."""
    sums: dict[str, dict[int, list[float]]] = {}  # [requests, errors, ttft_sum, ttft_count]
    series = 0
    for line in text.splitlines():
        if not line.startswith("loraplex_revision_"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) not in (REQUESTS, TTFT_SUM, TTFT_COUNT):
            continue
        labels = dict(_LABEL.findall(m.group(2)))
        adapter, revision = labels.get("adapter"), labels.get("revision", "")
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if not adapter or adapter in OTHER_LABELS or not revision.isdigit() or int(revision) < 1 or math.isnan(value):
            continue
        per_adapter = sums.setdefault(adapter, {})
        if int(revision) not in per_adapter:
            if series >= MAX_SERIES_PER_POD:
                continue
            series += 1
        c = per_adapter.setdefault(int(revision), [0.0, 0.0, 0.0, 0.0])
        if m.group(1) == REQUESTS:
            c[0] += value
            c[1] += value if is_error(labels.get("status", "")) else 0.0
        elif m.group(1) == TTFT_SUM:
            c[2] += value
        else:
            c[3] += value
    return {a: {n: RevisionHealth(*c) for n, c in revs.items()} for a, revs in sums.items() if revs}


@dataclass
class RevisionCounters:
    """Per base (Key of the BaseModelDeployment), per Ready pod, its last parsed counters. The
    runtime's `revision_counters`: the base's timer records, the LoraAdapter pass reads."""

    bases: dict[Key, dict[str, PodCounters]] = field(default_factory=dict)

    def record(self, namespace: str, base: str, texts: Mapping[str, str], ready: Iterable[str]) -> None:
        """One read of the base's pods (`texts`: pod -> /metrics). A Ready pod that did not
        answer keeps its last counters (dropping them would look like an engine restart to the
        analysis); a pod no longer Ready is forgotten."""
        ready = set(ready)
        pods = self.bases.setdefault(Key(namespace, base), {})
        for pod in [p for p in pods if p not in ready]:
            del pods[pod]
        for pod, text in texts.items():
            if pod in ready:
                pods[pod] = parse(text)

    def revision_health(self, namespace: str, base: str, adapter: str) -> dict[int, RevisionHealth]:
        """revision -> the adapter's counters summed over the base's Ready pods."""
        out: dict[int, list[float]] = {}
        for counters in self.bases.get(Key(namespace, base), {}).values():
            for n, h in counters.get(adapter, {}).items():
                c = out.setdefault(n, [0.0, 0.0, 0.0, 0.0])
                for i, v in enumerate((h.requests, h.errors, h.ttft_sum, h.ttft_count)):
                    c[i] += v
        return {n: RevisionHealth(*c) for n, c in sorted(out.items())}

    def forget(self, namespace: str, base: str) -> None:
        self.bases.pop(Key(namespace, base), None)
