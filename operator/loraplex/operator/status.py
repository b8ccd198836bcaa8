"""Status of the custom resources: conditions, phases and the Events their transitions deserve.

Pure functions. The operator computes the whole desired status, compares it with the live one
and writes only on a difference, so a restart of the operator writes nothing that is right.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable

from loraplex.manifest import AdapterState

from . import constants as C
from .adapters import is_transient

# --- conditions --------------------------------------------------------------------------------


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | str, reason: str, message: str = "") -> dict:
    if isinstance(status, bool):
        status = "True" if status else "False"
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(old: Iterable[dict] | None, new: Iterable[dict], generation: int | None,
                     now: str | None = None) -> list[dict]:
    """New conditions keep the old lastTransitionTime when their status did not change."""
    previous = {c.get("type"): c for c in (old or [])}
    out = []
    for c in new:
        c = dict(c)
        if generation is not None:
            c["observedGeneration"] = generation
        prev = previous.get(c["type"])
        if prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime"):
            c["lastTransitionTime"] = prev["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = now or now_iso()
        out.append(c)
    return sorted(out, key=lambda c: c["type"])


def get_condition(status: dict | None, type_: str) -> dict | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def differs(current: dict | None, desired: dict) -> bool:
    """Whether writing `desired` (a status fragment) would change `current`."""
    current = current or {}
    return any(current.get(k) != v for k, v in desired.items())


# --- LoraAdapter -------------------------------------------------------------------------------

ADAPTER_PHASES = ("Pending", "Loading", "Ready", "Degraded", "Failed")


@dataclass(frozen=True)
class PodView:
    """One engine pod as the operator sees it (built from the Pod object)."""

    name: str
    uid: str
    ip: str | None
    port: int
    ready: bool
    deleting: bool = False
    running: bool = True

    @property
    def target(self) -> bool:
        """Ready for Kubernetes: adapters are pushed to it and it counts as a replica."""
        return self.ready and bool(self.ip) and not self.deleting

    @property
    def candidate(self) -> bool:
        """Running with an address: adapters are pushed to it as soon as its engine answers,
        even before it is Ready (its readiness may wait on a preload adapter)."""
        return self.running and bool(self.ip) and not self.deleting


@dataclass
class AdapterVerdict:
    phase: str
    ready: int
    total: int
    ready_reason: str
    ready_message: str


def adapter_verdict(pods: list[dict], max_failures: int) -> AdapterVerdict:
    """Phase from the per-pod entries of status.pods ({name, state, bootId, message, failures})."""
    total = len(pods)
    if total == 0:
        return AdapterVerdict("Pending", 0, 0, "NoReadyPods", "no ready engine pod of the base yet")
    # `registered` counts as servable only while no load of it has failed there: after a failure
    # (even one seen at a request's first use) only a successful load makes it servable again.
    servable = [p for p in pods if p.get("state") in (AdapterState.HOST, AdapterState.DEVICE)
                or (p.get("state") == AdapterState.REGISTERED and not int(p.get("failures") or 0))]
    final = [p for p in pods if p.get("state") == AdapterState.FAILED and int(p.get("failures") or 0) >= max_failures
             and not is_transient(p.get("message") or "")]
    failing = [p for p in pods if p not in servable and p not in final
               and (p.get("state") == AdapterState.FAILED or int(p.get("failures") or 0))]
    unreachable = [p for p in pods if p.get("state") == C.STATE_UNREACHABLE]

    def problems(items: list[dict]) -> str:
        return "; ".join(f"{p['name']}: {p.get('message') or p.get('state')}" for p in items)

    if len(servable) == total:
        return AdapterVerdict("Ready", total, total, "Servable", f"servable on {total}/{total} pods")
    if len(final) == total:
        return AdapterVerdict("Failed", 0, total, "LoadFailed",
                              f"failed on every pod after {max_failures} attempts: {problems(final)}")
    if servable or final:
        bad = final + failing + unreachable
        detail = problems(bad) if bad else "loading on the other pods"
        return AdapterVerdict("Degraded", len(servable), total, "PartiallyServable",
                              f"servable on {len(servable)}/{total} pods; {detail}")
    if failing:
        return AdapterVerdict("Loading", 0, total, "Retrying", f"retrying: {problems(failing)}")
    if unreachable:
        return AdapterVerdict("Loading", 0, total, "EngineUnreachable", problems(unreachable))
    return AdapterVerdict("Loading", 0, total, "Loading", f"loading on {total} pods")


def adapter_status(*, generation: int | None, accepted: tuple[bool, str, str], pods: list[dict],
                   digest: str | None, max_failures: int, old: dict | None,
                   problem_phase: str | None = None, now: str | None = None,
                   extra_conditions: Iterable[dict] = ()) -> dict:
    """The full status of a LoraAdapter. `accepted` = (ok, reason, message); when it is not ok,
    `problem_phase` (Pending or Failed) is the phase and no pod is targeted. `extra_conditions`
    (the revisions' TrafficReady and Rollout) are added, replacing any of the same type."""
    ok, reason, message = accepted
    if ok:
        v = adapter_verdict(pods, max_failures)
        phase, ready, total = v.phase, v.ready, v.total
        ready_cond = condition("Ready", phase == "Ready", v.ready_reason, v.ready_message)
    else:
        phase, ready, total = problem_phase or "Pending", 0, len(pods)
        ready_cond = condition("Ready", False, reason, message)
    conds = [condition("Accepted", ok, "Accepted" if ok else reason,
                       "manifest accepted" if ok else message), ready_cond]
    extra = list(extra_conditions)
    conds = [c for c in conds if c["type"] not in {e["type"] for e in extra}] + extra
    status = {
        "phase": phase,
        "readyReplicas": ready,
        "totalReplicas": total,
        "pods": sorted(pods, key=lambda p: p["name"]),
        "observedGeneration": generation,
        "conditions": merge_conditions((old or {}).get("conditions"), conds, generation, now),
    }
    if digest is not None:
        status["manifestDigest"] = digest
    return status


def adapter_warnings(old: dict | None, new: dict) -> list[tuple[str, str, str]]:
    """The Events a LoraAdapter gets about itself: its own failures (LoadFailed per counted
    attempt, a spec problem, entering Failed). Everything that concerns many adapters at once
    (a pod unreachable or restarted, adapters becoming Ready) goes to the base, aggregated."""
    return [e for e in adapter_events(old, new)
            if e[1] not in ("EngineUnreachable", "Ready", "Loading", "Pending", "Degraded")]


def adapter_events(old: dict | None, new: dict) -> list[tuple[str, str, str]]:
    """(type, reason, message) Events for the transitions between two LoraAdapter statuses.
    (An engine restart is reported where it is detected, in reconcile: a restarting pod leaves
    the status while it is not Ready, so two statuses do not show it.)"""
    old = old or {}
    events: list[tuple[str, str, str]] = []
    old_pods = {p["name"]: p for p in old.get("pods") or []}
    for p in new.get("pods") or []:
        before = old_pods.get(p["name"])
        became_failed = p.get("state") == AdapterState.FAILED and (
            before is None or before.get("state") != AdapterState.FAILED
            or int(before.get("failures") or 0) != int(p.get("failures") or 0))
        if became_failed:
            events.append(("Warning", "LoadFailed",
                           f"pod {p['name']} (attempt {p.get('failures', 1)}): {p.get('message', '')}"))
        elif p.get("state") == C.STATE_UNREACHABLE and (before or {}).get("state") != C.STATE_UNREACHABLE:
            events.append(("Warning", "EngineUnreachable", f"pod {p['name']}: {p.get('message', '')}"))
    accepted_old, accepted_new = get_condition(old, "Accepted"), get_condition(new, "Accepted")
    if accepted_new and accepted_new["status"] == "False" and (
            accepted_old is None or accepted_old.get("status") != "False"
            or accepted_old.get("reason") != accepted_new.get("reason")):
        events.append(("Warning", accepted_new["reason"], accepted_new.get("message", "")))
    if old.get("phase") != new.get("phase"):
        ready = get_condition(new, "Ready") or {}
        kind = "Warning" if new["phase"] in ("Failed", "Degraded") else "Normal"
        events.append((kind, new["phase"], ready.get("message", "")))
    return events


# --- BaseModelDeployment -----------------------------------------------------------------------


def base_status(*, bmd: dict, pods: list[PodView], desired_replicas: int, adapters: int,
                endpoint: str, selector: str, deployment: dict | None, render_error: str | None,
                old: dict | None, now: str | None = None, extra_conditions: Iterable[dict] = (),
                admin_secret: str | None = None, from_zero_seconds: float | None = None) -> dict:
    generation = bmd.get("metadata", {}).get("generation")
    live = [p for p in pods if not p.deleting]
    ready = sum(1 for p in live if p.target)
    dep_conds = {c.get("type"): c for c in ((deployment or {}).get("status") or {}).get("conditions") or []}
    stuck = dep_conds.get("Progressing", {}).get("reason") == "ProgressDeadlineExceeded"
    if render_error:
        phase = "Failed"
    elif stuck:
        phase = "Failed" if ready == 0 else "Degraded"
    elif desired_replicas == 0:
        phase = "Ready"  # scaled to zero on purpose
    elif ready >= desired_replicas:
        phase = "Ready"
    elif ready > 0:
        phase = "Degraded"
    else:
        phase = "Pending"
    if render_error:
        progressing = condition("Progressing", False, "InvalidSpec", render_error)
    elif stuck:
        progressing = condition("Progressing", False, "ProgressDeadlineExceeded",
                                dep_conds["Progressing"].get("message", ""))
    elif ready < desired_replicas or len(live) != desired_replicas:
        progressing = condition("Progressing", True, "RollingOut",
                                f"{ready}/{desired_replicas} engine pods ready, {len(live)} present")
    else:
        progressing = condition("Progressing", False, "Complete", f"{ready} engine pods ready")
    conds = [
        condition("Available", ready > 0 or desired_replicas == 0,
                  "MinimumReplicasAvailable" if ready > 0 else "NoReadyReplicas",
                  f"{ready}/{desired_replicas} engine pods ready"),
        progressing,
        condition("Degraded", phase in ("Degraded", "Failed"),
                  "Degraded" if phase in ("Degraded", "Failed") else "AsExpected",
                  render_error or (f"only {ready}/{desired_replicas} engine pods ready"
                                   if phase in ("Degraded", "Failed") else "")),
        *extra_conditions,
    ]
    out = {
        "phase": phase,
        "replicas": len(live),
        "readyReplicas": ready,
        "desiredReplicas": desired_replicas,
        "adapters": adapters,
        "endpoint": endpoint,
        "selector": selector,
        "observedGeneration": generation,
        "conditions": merge_conditions((old or {}).get("conditions"), conds, generation, now),
    }
    if admin_secret:
        out["adminTokenSecret"] = admin_secret
    if from_zero_seconds is not None:  # else the last one stays
        out["lastScaleFromZeroSeconds"] = round(from_zero_seconds, 1)
    return out


def condition_events(old: dict | None, new: dict, type_: str) -> list[tuple[str, str, str]]:
    """A Warning (reason: the condition's) when the condition turns not True, or its reason or
    message changes while not True; a Normal `<type_>` when it turns True again."""
    before, after = get_condition(old, type_), get_condition(new, type_)
    if after is None:
        return []
    if after["status"] != "True":
        if before is None or any(before.get(k) != after.get(k) for k in ("status", "reason", "message")):
            return [("Warning", after.get("reason") or type_, after.get("message", ""))]
        return []
    if before is not None and before.get("status") != "True":
        return [("Normal", type_, after.get("message", ""))]
    return []


def base_events(old: dict | None, new: dict) -> list[tuple[str, str, str]]:
    old = old or {}
    events = []
    if old.get("phase") != new.get("phase"):
        kind = "Warning" if new["phase"] in ("Failed", "Degraded") else "Normal"
        deg = get_condition(new, "Degraded") or {}
        prog = get_condition(new, "Progressing") or {}
        events.append((kind, new["phase"], deg.get("message") or prog.get("message") or ""))
    woke = new.get("lastScaleFromZeroSeconds")
    if woke is not None and woke != old.get("lastScaleFromZeroSeconds"):
        events.append(("Normal", "ScaledFromZero", f"first engine pod Ready {woke:g} s after the scale-up from zero"))
    return events + condition_events(old, new, "TenantsReady") + condition_events(old, new, "ScaleToZero")


def _engine_port(spec: dict) -> int:
    """The engine container's port named `http` (the one the operator rendered), else its
    first declared port, else the default."""
    containers = list(spec.get("containers") or [])
    engine = [c for c in containers if c.get("name") == C.ENGINE_CONTAINER] or containers[:1]
    for c in engine:
        ports = [p for p in c.get("ports") or [] if p.get("containerPort")]
        named = [p for p in ports if p.get("name") == C.ENGINE_PORT_NAME]
        if named or ports:
            return int((named or ports)[0]["containerPort"])
    return C.DEFAULT_ENGINE_PORT


def pod_view(pod: dict) -> PodView:
    """PodView from a Pod body: its IP, the engine container's `http` port, its readiness."""
    meta, spec, st = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    port = _engine_port(spec)
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
    running = st.get("phase", "Running") == "Running"
    ready = ready and running
    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid", "") or "",
        ip=st.get("podIP") or None,
        port=port,
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        running=running,
    )

