"""The base pass: one level-triggered pass over a BaseModelDeployment and all its LoraAdapters,
as a short sequence of calls into the module of each concern. Each step reads what is, compares
it with what should be, and writes only the difference.

  sync.accept_adapters    the adapters -> manifests (or the spec problem of each)
  tenants.ensure_api_keys the tenants -> the API keys Secret (limits divided over the ready pods)
  placement.place_adapters which pods keep which adapter warm (auto: by demand.py's decisions)
  revision_pass.plan_revisions each adapter's revisions and traffic split -> the served manifests
  owned.ensure_owned      admin Secret, ConfigMap, Deployment, Service, Ingress, InferencePool,
                          and for scale to zero the HTTPScaledObject and the wake Service
  sync.sync_pods          every pod brought to its placed set
  publish.adapter_statuses the adapters' statuses and the Events on the base
  status.base_status      the base's own status
"""
from __future__ import annotations

import time

from . import adapters as A
from . import constants as C
from . import metrics
from . import owned
from . import placement as P
from . import publish
from . import render
from . import revision_pass
from . import scaletozero as Z
from . import status as S
from . import sync
from . import tenants
from .constants import Key
from .runtime import Runtime


async def reconcile_base(rt: Runtime, base: dict, pods: list[S.PodView], adapters: list[dict]) -> float:
    """One pass over a BaseModelDeployment: owned objects, the adapters onto their pods, then
    the statuses. Returns the seconds until the next pass."""
    meta = base["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return rt.config.resync_interval
    started = time.monotonic()
    # An adapter's deletion handler DELETEs it from the pods under this lock, so a pass that took
    # its snapshot before the deletion cannot PUT it back afterwards (the adapter would then be no
    # longer managed, and nothing would remove it again); passes after it skip its uid (rt.sync.unloaded).
    async with rt.sync.locks[Key(ns, name)]:
        accepted = await sync.accept_adapters(rt, base, adapters)
        # Before the Deployment that mounts it: a new base's pods find their keys file.
        tenants_ready = await tenants.ensure_api_keys(rt, base, pods)
        by_name = {a["name"]: a for a in adapters}
        candidates = [p.name for p in pods if p.candidate]
        wants, reasons = P.wants_of(accepted.placements, by_name, rt.adapter_rates.base(ns, name).warm,
                                    len(candidates))
        placed = P.place_adapters(rt.placements, ns, name, wants, by_name, candidates)
        # The served manifests (with their revisions) before anything carries them: the ConfigMap, the pushes.
        ready_pods = {p.name for p in pods if p.target}
        revs = revision_pass.plan_revisions(rt, base, adapters, accepted, placed, ready_pods)
        applied = await owned.ensure_owned(rt, base, sync.preload_manifests(accepted, adapters))
        pods_synced = await sync.sync_pods(rt, base, adapters, accepted, placed, pods)
        revision_statuses = {n: revision_pass.status_of(rp, placed.get(n, []), ready_pods,
                                                        pods_synced.records.get(n, {})) for n, rp in revs.items()}
        statuses = await publish.adapter_statuses(rt.kube, rt.status, rt.config, base, adapters, accepted.problems,
                                                  placed, pods_synced.records, pods_synced.took_part,
                                                  pods_synced.digests, reasons, revision_statuses)
        await publish.post_events(rt.kube, base, pods_synced.events + statuses.events)
    await write_base_status(rt, base, pods, adapters, applied, [tenants_ready] if tenants_ready else [])
    metrics.RECONCILE_SECONDS.labels(kind="BaseModelDeployment").observe(time.monotonic() - started)
    return statuses.delay


async def write_base_status(rt: Runtime, base: dict, pods: list[S.PodView], adapters: list[dict],
                            applied: owned.Applied, conditions: list[dict]) -> None:
    ns, name = base["metadata"]["namespace"], base["metadata"]["name"]
    observed = ((applied.deployment or {}).get("spec") or {}).get("replicas")
    desired = observed if observed is not None else render.deployment_replicas(base.get("spec"), None)
    # KEDA or the autoscaler took the base from zero: the seconds to its first Ready pod.
    from_zero = rt.zero.observe(Key(ns, name), observed, sum(1 for p in pods if p.target), time.monotonic())
    ref = publish.bmd_ref(ns, name)
    new = S.base_status(
        bmd=base, pods=pods, desired_replicas=int(desired),
        adapters=sum(1 for a in adapters if not a.get("deleting")),
        endpoint=render.endpoint(base, Z.entry(base) if applied.handed_over else None),
        selector=C.selector_string(name), deployment=applied.deployment, render_error=applied.render_error,
        old=publish.current_status(rt.status, ref, base),
        extra_conditions=[c for c in (applied.pool_condition, applied.zero_condition) if c] + conditions,
        admin_secret=A.admin_token_ref(base.get("spec"), name).name, from_zero_seconds=from_zero)
    await publish.write_status(rt.kube, rt.status, ref, base, new, S.base_events)


async def reconcile_orphan(rt: Runtime, body: dict) -> None:
    """A LoraAdapter whose base does not exist (yet: GitOps applies in any order): Pending."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return
    rt.sync.records.pop(Key(meta["namespace"], meta["name"]), None)
    await publish.orphan_status(rt.kube, rt.status, rt.config, body)
