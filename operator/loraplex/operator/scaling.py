"""Autoscaling of a base's Deployment: scrape the engines' /metrics, ask autoscale.decide (pure),
patch the Deployment's replicas and the base's status when the decision differs. ScaleMemory
keeps each base's recommendation history between the timer's runs.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import metrics
from . import render
from . import status as S
from .autoscale import METRICS, Decision, Policy, decide, parse_metric
from .constants import Key
from .engine_client import EngineError, EngineUnreachable
from .kube import Ref
from .publish import bmd_ref, post_events

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("loraplex.operator")


@dataclass
class ScaleMemory:
    """Per base: the autoscaler's recommendation history, as autoscale.decide takes it."""

    history: dict[Key, tuple[tuple[float, int], ...]] = field(default_factory=dict)


async def scrape(rt: Runtime, pods: list[S.PodView], metric: str) -> list[float]:
    name = METRICS[metric]

    async def one(p: S.PodView) -> float | None:
        try:
            return parse_metric(await rt.engine.metrics(p.ip, p.port), name)  # type: ignore[arg-type]
        except (EngineError, EngineUnreachable) as e:
            log.info("metrics of pod %s unavailable: %s", p.name, e)
            return None
    values = await asyncio.gather(*(one(p) for p in pods if p.target))
    return [v for v in values if v is not None]


async def autoscale_base(rt: Runtime, base: dict, pods: list[S.PodView], now: float | None = None) -> Decision | None:
    meta = base["metadata"]
    key = Key(meta["namespace"], meta["name"])
    spec = render.with_defaults(base.get("spec"))
    if not spec["autoscaling"]["enabled"] or meta.get("deletionTimestamp"):
        rt.scaling.history.pop(key, None)
        return None
    dep_ref = Ref("apps/v1", "deployments", key.namespace, key.name)
    dep = await rt.kube.get(dep_ref)
    if dep is None:
        return None
    current = int((dep.get("spec") or {}).get("replicas", 1))
    policy = Policy.from_spec(spec["autoscaling"])
    samples = await scrape(rt, pods, policy.metric)
    now = time.monotonic() if now is None else now
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
