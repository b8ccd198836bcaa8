"""The base's timer: one read of every Ready engine pod's /metrics per interval feeds two
decisions. Autoscaling of the base's Deployment: autoscale.decide (pure), then the Deployment's
replicas and the base's status patched when the decision differs (never while KEDA owns the
replicas, scaletozero.py). Load-following placement: the adapters' request counters into
`rt.adapter_rates` (demand.py), and demand.decide (pure) for every `replicas: auto` adapter; the
base pass places by those decisions (placement.want_of). Rollouts: the revisions' counters into
`rt.revision_counters` (revisionhealth.py), which the rollout analysis reads. ScaleMemory keeps each base's
recommendation history between the timer's runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import demand
from . import metrics
from . import owned
from . import placement as P
from . import render
from . import status as S
from .adapters import SpecProblem
from .autoscale import METRICS, Decision, Policy, decide, parse_metric
from .constants import Key
from .engine_client import EngineError, EngineUnreachable
from .kube import Ref
from .publish import bmd_ref, post_events
from .sync import engine_token

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("loraplex.operator")


@dataclass
class ScaleMemory:
    """Per base: the autoscaler's recommendation history, as autoscale.decide takes it."""

    history: dict[Key, tuple[tuple[float, int], ...]] = field(default_factory=dict)


async def scrape(rt: Runtime, pods: list[S.PodView], token: str | None) -> dict[str, str]:
    """pod name -> its /metrics text, for the Ready pods that answer."""
    async def one(p: S.PodView) -> tuple[str, str | None]:
        try:
            return p.name, await rt.engine.metrics(p.ip, p.port, token)  # type: ignore[arg-type]
        except (EngineError, EngineUnreachable) as e:
            log.info("metrics of pod %s unavailable: %s", p.name, e)
            return p.name, None
    answers = await asyncio.gather(*(one(p) for p in pods if p.target))
    return {name: text for name, text in answers if text is not None}


async def observe_base(rt: Runtime, base: dict, pods: list[S.PodView], adapters: list[dict],
                       now: float | None = None) -> bool:
    """The timer's run over one base. True when an auto adapter's warm count changed (the
    caller then wakes the base's pass to place it)."""
    meta = base["metadata"]
    key = Key(meta["namespace"], meta["name"])
    if meta.get("deletionTimestamp"):
        rt.scaling.history.pop(key, None)
        rt.adapter_rates.forget(key.namespace, key.name)
        rt.revision_counters.forget(key.namespace, key.name)
        return False
    now = time.monotonic() if now is None else now
    texts = await scrape(rt, pods, await engine_token(rt, key.namespace, base)) if any(p.target for p in pods) else {}
    rt.revision_counters.record(key.namespace, key.name, texts, [p.name for p in pods if p.target])
    await autoscale_base(rt, base, texts, now)
    return follow_demand(rt, base, adapters, texts, [p.name for p in pods if not p.deleting], now)


def follow_demand(rt: Runtime, base: dict, adapters: list[dict], texts: dict[str, str], live: list[str],
                  now: float) -> bool:
    """Record the adapters' counters and decide the auto adapters' warm counts."""
    meta = base["metadata"]
    bd = rt.adapter_rates.base(meta["namespace"], meta["name"])
    default = render.with_defaults(base.get("spec"))["placement"]
    try:
        bd.window = float(demand.AutoPolicy.from_spec(default).window)
    except SpecProblem:
        bd.window = float(demand.DEFAULT_WINDOW)
    autos: dict[str, tuple[demand.AutoPolicy, dict]] = {}
    for a in adapters:
        if a.get("deleting"):
            continue
        try:
            spec = P.resolve(a["spec"].get("placement"), default, bool(a["spec"].get("preload")))
        except SpecProblem:
            continue  # the base pass reports it on the adapter
        if spec.replicas == P.AUTO and spec.auto is not None:
            autos[a["name"]] = (spec.auto, a)
    keep = max([bd.window] + [pol.window for pol, _ in autos.values()])
    bd.record({pod: demand.adapter_counts(text) for pod, text in texts.items()}, now, keep, live)
    changed = False
    for name, (pol, a) in autos.items():
        prev = bd.warm.get(name)
        status = a.get("status") or {}
        current = prev.count if prev is not None else len(status.get("placement") or []) or None
        said = status.get("placementReason")
        if prev is None and current is not None and said:
            # A fresh operator: the status says why it has its count; kept while the count stays
            # (a restart writes nothing that is right).
            prev = demand.Warmth(current, said, measured=demand.UNMEASURED not in said)
        w = demand.decide(current, bd.rate(name, pol.window, now), pol, prev, now)
        if prev is not None and w.keeps_reason_of(prev):
            w = dataclasses.replace(w, reason=prev.reason, measured=prev.measured)  # no status churn
        changed |= name not in bd.warm or (prev is not None and w.count != prev.count)
        if prev is not None and w.count != prev.count:
            log.info("adapter %s/%s: %d -> %d warm pods (%s)", meta["namespace"], name, prev.count, w.count, w.reason)
        bd.warm[name] = w
    for gone in [n for n in bd.warm if n not in autos]:
        del bd.warm[gone]
    return changed


async def autoscale_base(rt: Runtime, base: dict, texts: dict[str, str], now: float) -> Decision | None:
    meta = base["metadata"]
    key = Key(meta["namespace"], meta["name"])
    spec = render.with_defaults(base.get("spec"))
    if not spec["autoscaling"]["enabled"] or await owned.handed_over(rt, base.get("spec")):
        rt.scaling.history.pop(key, None)  # off, or KEDA owns the replicas: never fight it
        return None
    dep_ref = Ref("apps/v1", "deployments", key.namespace, key.name)
    dep = await rt.kube.get(dep_ref)
    if dep is None:
        return None
    current = int((dep.get("spec") or {}).get("replicas", 1))
    policy = Policy.from_spec(spec["autoscaling"])
    # minReplicas 0 without the KEDA HTTP add-on: nothing would hold the requests, so at least 1.
    policy = dataclasses.replace(policy, min_replicas=max(policy.min_replicas, 1))
    samples = [v for v in (parse_metric(t, METRICS[policy.metric]) for t in texts.values()) if v is not None]
    if key not in rt.scaling.history:
        # A fresh operator (a restart, a new leader) knows no history: seed it with the current
        # size, so that no scale-down happens before a whole down-window of its own samples.
        rt.scaling.history[key] = ((now, current),)
    decision = decide(current, samples, policy, rt.scaling.history[key], now)
    rt.scaling.history[key] = decision.history
    if decision.desired == current:
        return decision
    await rt.kube.patch(dep_ref, {"spec": {"replicas": decision.desired}})
    await rt.kube.patch_status(bmd_ref(key.namespace, key.name), {"desiredReplicas": decision.desired,
                                                                  "lastScaleTime": S.now_iso()})
    metrics.AUTOSCALER.labels(direction="up" if decision.desired > current else "down").inc()
    await post_events(rt.kube, base, [("Normal", "Scaled", f"{current} -> {decision.desired} replicas: "
                                                             f"{decision.reason}")])
    log.info("scaled %s/%s from %d to %d: %s", key.namespace, key.name, current, decision.desired, decision.reason)
    return decision
