"""The traffic decision of a LoraAdapter with revisions (issue 23): each revision's share of the
requests for the adapter's name (status.traffic), the revisions the engines must have loaded,
and the progressive rollout (status.rollout) with its analysis.

Pure: no I/O, and `now` is the only clock. The plan depends only on its inputs (the spec, the
last status, the pods' readiness and the scraped health counters), so the reconcile loop calls
it on every pass and writes the status only on a difference (level-triggered, idempotent).

Modes (docs/operator.md, "Revisions and rollouts: the decision"):
- neither spec.traffic nor spec.rollout: 100 % to the latest revision once it is ready;
- spec.traffic: a fixed split, applied once every revision it gives more traffic is ready;
- spec.rollout: the latest revision is the canary, moved through the steps against the stable
  one; each step's end compares their error rate and mean TTFT over the step.
Traffic moves to a revision only once it is loaded (host or device) on every Ready pod it is
placed on, so its first request is warm there; until then the last status.traffic stays.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .status import condition, get_condition

ROLLOUT_DEFAULTS = {"steps": [10, 50, 100], "stepSeconds": 300, "maxErrorRatio": 1.5, "maxTTFTRatio": 1.5,
                    "minRequests": 20}
ERROR_SLACK = 0.01       # a canary may always err 1 point more than the stable (0 % vs 0.5 % is noise)
HOLD_RECHECK = 30.0      # a step waiting for canary traffic is re-evaluated at least this often
MAX_TRAFFIC_ENTRIES = 16  # the CRD's bound on spec.traffic (and the manifest's on served revisions)
WARNING_REASONS = {"RevisionFailed", "UnknownRevision", "InvalidTraffic", "InvalidRollout"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

Split = dict  # revision number -> percent (> 0), summing to 100


@dataclass(frozen=True)
class RevisionHealth:
    """Summed over the base's Ready pods: cumulative counters as scraped now."""

    requests: float = 0.0
    errors: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0

    def since(self, base: "RevisionHealth") -> "RevisionHealth":
        """The increase over `base`; a counter lower than its base started again (an engine
        restarted): its current value is the increase."""
        def d(now: float, then: float) -> float:
            return now - then if now >= then else now
        return RevisionHealth(d(self.requests, base.requests), d(self.errors, base.errors),
                              d(self.ttft_sum, base.ttft_sum), d(self.ttft_count, base.ttft_count))

    def to_status(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "ttftSum": self.ttft_sum,
                "ttftCount": self.ttft_count}

    @classmethod
    def from_status(cls, d: Mapping | None) -> "RevisionHealth":
        d = d or {}
        return cls(float(d.get("requests", 0)), float(d.get("errors", 0)), float(d.get("ttftSum", 0)),
                   float(d.get("ttftCount", 0)))


@dataclass(frozen=True)
class Readiness:
    """Of one revision, from the pods' listings."""

    ready: bool                 # host or device on every Ready pod it is placed on (and on at least one)
    failed: str | None = None   # a pod's load failure message, if any pod reports it failed


@dataclass
class TrafficPlan:
    traffic: list[dict]         # status.traffic, newest first, only entries with percent > 0
    serve: list[int]            # revisions the engines must have loaded (ascending)
    rollout: dict | None        # status.rollout
    conditions: list[dict] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None


class Invalid(Exception):
    """A spec.traffic or spec.rollout the CRD's rules should have refused."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# --- splits ---------------------------------------------------------------------------------------


def describe(split: Mapping[int, int]) -> str:
    return ", ".join(f"revision {n} {p} %" for n, p in sorted(split.items(), reverse=True)) or "none"


def to_status(split: Mapping[int, int], flagged: int | None) -> list[dict]:
    """status.traffic: newest first; `flagged` (the revision a latestRevision entry resolved to)
    carries latestRevision: true."""
    return [{"revision": n, "percent": p, **({"latestRevision": True} if n == flagged else {})}
            for n, p in sorted(split.items(), reverse=True) if p > 0]


def previous_split(status: Mapping, known: set[int]) -> tuple[Split | None, int | None]:
    """The traffic in effect (status.traffic) and its latestRevision entry, or None when there is
    none usable (never set, or it names revisions no longer known)."""
    split: Split = {}
    flagged = None
    for e in status.get("traffic") or []:
        try:
            n, p = int(e["revision"]), int(e["percent"])
        except (KeyError, TypeError, ValueError):
            return None, None
        if n not in known or p < 0:
            return None, None
        split[n] = split.get(n, 0) + p
        flagged = n if e.get("latestRevision") else flagged
    split = {n: p for n, p in split.items() if p > 0}
    return (split, flagged) if sum(split.values()) == 100 else (None, None)


def resolve(entries: list, latest: int) -> tuple[Split, int | None, set[int]]:
    """spec.traffic as (split with the percent-0 entries left out, the latestRevision's revision,
    every revision named). Raises Invalid for what the CEL rules refuse."""
    if not isinstance(entries, list) or not entries or len(entries) > MAX_TRAFFIC_ENTRIES:
        raise Invalid("InvalidTraffic", f"spec.traffic must list 1 to {MAX_TRAFFIC_ENTRIES} entries")
    split: Split = {}
    named: set[int] = set()
    flagged, seen, latest_entries = None, set(), 0
    for e in entries:
        e = e if isinstance(e, Mapping) else {}
        p = e.get("percent")
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 100:
            raise Invalid("InvalidTraffic", f"spec.traffic percent must be an integer in [0, 100], got {p!r}")
        if e.get("latestRevision") is True and "revision" not in e:
            latest_entries += 1
            n = flagged = latest
        elif "revision" in e and not e.get("latestRevision"):
            n = e["revision"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n in seen:
                raise Invalid("InvalidTraffic", f"spec.traffic revision {n!r}: a revision number >= 1, named once")
            seen.add(n)
        else:
            raise Invalid("InvalidTraffic", "each spec.traffic entry has exactly one of revision and latestRevision: true")
        named.add(n)
        split[n] = split.get(n, 0) + p
    if latest_entries > 1:
        raise Invalid("InvalidTraffic", "spec.traffic has at most one latestRevision entry")
    if sum(split.values()) != 100:
        raise Invalid("InvalidTraffic", f"spec.traffic percents must sum to 100, got {sum(split.values())}")
    return {n: p for n, p in split.items() if p > 0}, flagged, named


def gate(target: Split, before: Split | None, readiness: Callable[[int], Readiness]) -> tuple[str, str] | None:
    """Why `target` may not apply yet: a revision it gives more traffic failed to load or is not
    ready everywhere it is placed. None: it may. With no traffic before there is nothing to protect."""
    if before is None:
        return None
    gaining = sorted(n for n, p in target.items() if p > before.get(n, 0))
    failed = [(n, readiness(n).failed) for n in gaining if readiness(n).failed]
    if failed:
        return "RevisionFailed", "; ".join(f"revision {n} failed to load: {m}" for n, m in failed)
    waiting = [n for n in gaining if not readiness(n).ready]
    if waiting:
        return "RevisionNotReady", (f"revision{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))} "
                                    "not loaded on every pod it is placed on yet")
    return None


# --- the plan -------------------------------------------------------------------------------------


def plan_traffic(spec: Mapping, status: Mapping, latest: int, known: set[int],
                 readiness: Mapping[int, Readiness], health: Mapping[int, "RevisionHealth"],
                 now: dt.datetime) -> TrafficPlan:
    """The traffic, the served revisions and the rollout of one LoraAdapter (see the module doc)."""
    from . import rollout  # the rollout mode's state machine (its own module: one job each)

    spec, status = spec or {}, status or {}
    known = set(known) | {latest}
    ready = lambda n: readiness.get(n) or Readiness(False)  # noqa: E731
    before, before_flag = previous_split(status, known)
    try:
        if spec.get("traffic") is not None and spec.get("rollout") is not None:
            raise Invalid("InvalidTraffic", "spec.traffic and spec.rollout are mutually exclusive")
        if spec.get("rollout") is not None:
            plan = rollout.plan(rollout.Config.from_spec(spec["rollout"]), status.get("rollout"), before,
                                latest, known, ready, health, now)
        elif spec.get("traffic") is not None:
            plan = fixed(spec["traffic"], before, before_flag, latest, known, ready)
        else:
            plan = follow_latest(before, before_flag, latest, ready)
    except Invalid as e:
        kept = before or {latest: 100}
        plan = TrafficPlan(to_status(kept, before_flag if before_flag == latest else None), sorted(kept),
                           status.get("rollout"),
                           [condition("TrafficReady", False, e.reason, f"{e.message}; traffic stays: {describe(kept)}")])
        if status.get("rollout"):
            plan.conditions.append(rollout.condition_of(status["rollout"]))
    plan.events = traffic_events(status, plan) + plan.events
    return plan


def kept_plan(before: Split | None, before_flag: int | None, latest: int, reason: str, why: str,
              serve: set[int]) -> TrafficPlan:
    """Traffic stays where it was (for `why`), with `serve` loaded meanwhile."""
    kept = before or {latest: 100}
    flag = before_flag if before_flag == latest else None  # a flag on an older revision would lie
    return TrafficPlan(to_status(kept, flag), sorted(set(kept) | serve), None,
                       [condition("TrafficReady", False, reason, f"{why}; traffic stays: {describe(kept)}")])


def applied(split: Split, flag: int | None, serve: set[int]) -> TrafficPlan:
    return TrafficPlan(to_status(split, flag), sorted(set(split) | serve), None,
                       [condition("TrafficReady", True, "Applied", describe(split))])


def follow_latest(before: Split | None, before_flag: int | None, latest: int,
                  ready: Callable[[int], Readiness]) -> TrafficPlan:
    """No spec.traffic, no spec.rollout: 100 % to the latest revision once it is ready."""
    target = {latest: 100}
    blocked = gate(target, before, ready)
    if blocked:
        return kept_plan(before, before_flag, latest, blocked[0], blocked[1], {latest})
    return applied(target, latest, set())


def fixed(entries: list, before: Split | None, before_flag: int | None, latest: int, known: set[int],
          ready: Callable[[int], Readiness]) -> TrafficPlan:
    """spec.traffic: the split, once every revision it gives more traffic is ready; the revisions
    it names at 0 % are loaded too (pinnable as `<name>@<n>`)."""
    target, flag, named = resolve(entries, latest)
    unknown = sorted(named - known)
    if unknown:
        return kept_plan(before, before_flag, latest, "UnknownRevision",
                         f"spec.traffic names revision{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(str, unknown))}, not among the known revisions "
                         f"{', '.join(map(str, sorted(known)))}", named & known)
    blocked = gate(target, before, ready)
    if blocked:
        return kept_plan(before, before_flag, latest, blocked[0], blocked[1], named)
    return applied(target, flag, named)


def traffic_events(status: Mapping, plan: TrafficPlan) -> list[tuple[str, str, str]]:
    """A Normal TrafficShifted when the split changes (outside a rollout, whose own events say
    so), a Warning when TrafficReady turns False for a reason a user must act on."""
    events = []
    old = {e.get("revision"): e.get("percent") for e in status.get("traffic") or [] if isinstance(e, Mapping)}
    new = {e["revision"]: e["percent"] for e in plan.traffic}
    if old and old != new and plan.rollout is None:
        events.append(("Normal", "TrafficShifted", f"{describe(new)} (was {describe(old)})"))
    after, prev = get_condition({"conditions": plan.conditions}, "TrafficReady"), get_condition(dict(status), "TrafficReady")
    if after and after["status"] != "True" and after["reason"] in WARNING_REASONS and (
            prev is None or any(prev.get(k) != after.get(k) for k in ("status", "reason", "message"))):
        events.append(("Warning", after["reason"], after["message"]))
    return events


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, TIME_FORMAT).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime(TIME_FORMAT)
