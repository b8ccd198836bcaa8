"""The reconcile steps the kopf handlers call: owned objects, the adapters ConfigMap, adapter
pushes, status and Events. Level-triggered: each step reads what is, compares it with what
should be, and writes only the difference.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Union

from . import adapters as A
from . import apply
from . import constants as C
from . import render
from . import status as S
from .adapters_sync import PodRecord, next_wakeup, sync_pods
from .autoscale import METRICS, Policy, decide, parse_metric
from .engine_client import EngineError, EngineUnreachable
from .kube import ApiError, Ref
from .runtime import Runtime

log = logging.getLogger("loraplex.operator")

PENDING_REASONS = frozenset({"BaseNotFound", "SecretNotFound", "SecretKeyNotFound"})

# The LoraAdapters of a base: a list, or a function returning the current list (read from the
# live index only once the ConfigMap lock is held, so the last write is never a stale snapshot).
Adapters = Union[list, Callable[[], list]]


def _now(adapters: Adapters) -> list:
    return list(adapters() if callable(adapters) else adapters)


def bmd_ref(namespace: str, name: str) -> Ref:
    return Ref(C.API_VERSION, C.BMD_PLURAL, namespace, name)


def lora_ref(namespace: str, name: str) -> Ref:
    return Ref(C.API_VERSION, C.LORA_PLURAL, namespace, name)


async def post_events(rt: Runtime, body: dict, events: Iterable[tuple[str, str, str]]) -> None:
    for type_, reason, message in events:
        try:
            await rt.kube.post_event(body, type=type_, reason=reason, message=message)
        except (ApiError, OSError) as e:  # Events are auxiliary: never fail a reconcile for one
            log.warning("could not post Event %s/%s: %s", reason, message, e)


# How long the operator trusts its own last status write over the body it was handed (which
# lags behind until the watch delivers that write). Past it, the live object is the truth again.
STATUS_MEMORY_SECONDS = 10.0


def current_status(rt: Runtime, ref: Ref, body: dict) -> dict:
    """The status as it is now: the body's, or this operator's own write that the body does not
    show yet. Without it a pass right after a write would write (and announce) the same twice."""
    live = body.get("status") or {}
    mem = rt.written_status.get((ref.plural, ref.namespace, ref.name))
    if mem and time.monotonic() - mem[0] < STATUS_MEMORY_SECONDS and S.differs(live, mem[1]):
        return {**live, **{k: v for k, v in mem[1].items() if v is not None}}
    return live


async def write_status(rt: Runtime, ref: Ref, body: dict, new: dict, events) -> bool:
    """Patch the status when it differs; post the Events of the transition. True if written."""
    old = current_status(rt, ref, body)
    if not S.differs(old, new):
        return False
    await rt.kube.patch_status(ref, new)
    rt.written_status[(ref.plural, ref.namespace, ref.name)] = (time.monotonic(), new)
    log.info("status of %s %s/%s: %s -> %s", ref.plural, ref.namespace, ref.name, old.get("phase"), new.get("phase"))
    await post_events(rt, body, events(old, new))
    return True


# --- BaseModelDeployment: owned objects --------------------------------------------------------

def _base_stub(namespace: str, name: str, uid: str) -> dict:
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid}}


async def desired_manifest(rt: Runtime, namespace: str, name: str, spec: dict, base_spec: dict | None):
    """Validate a LoraAdapter against its base and build its manifest (API keys read from their
    Secrets and hashed). Raises adapters.SpecProblem."""
    A.validate(name, spec, base_spec)
    src_secret = ((spec.get("source") or {}).get("secretRef") or {}).get("name")
    if src_secret and await rt.get_secret(namespace, src_secret) is None:
        raise A.SpecProblem("SecretNotFound", f"source credentials Secret {src_secret!r} not found")
    refs = A.api_key_refs(spec)
    secrets = {r.name: await rt.get_secret(namespace, r.name) for r in refs}
    return A.build_manifest(name, spec, A.tenant_hashes(refs, secrets))


async def engine_token(rt: Runtime, namespace: str, base: dict | None) -> str | None:
    """The admin token the base's engines require (None when they require none)."""
    ref = A.admin_token_ref((base or {}).get("spec"))
    if ref is None:
        return None
    return A.admin_token(ref, await rt.get_secret(namespace, ref.name))


async def _token_or_none(rt: Runtime, namespace: str, base: dict | None) -> str | None:
    try:
        return await engine_token(rt, namespace, base)
    except A.SpecProblem:
        return None


async def adapter_manifests(rt: Runtime, namespace: str, base: dict, adapters: Iterable[dict],
                            phases: dict[str, str] | None = None) -> list:
    """The manifests the base's ConfigMap should hold: every accepted adapter of the base that is
    not being deleted and has not Failed on every pod (a Failed one is withdrawn so that new
    pods do not trip over it; a spec change admits it again)."""
    out = []
    for a in sorted(adapters, key=lambda a: a["name"]):
        if a.get("deleting"):
            continue
        phase = (phases or {}).get(a["name"], a.get("phase"))
        if phase == "Failed" and a.get("observedGeneration") == a.get("generation"):
            continue
        try:
            out.append(await desired_manifest(rt, namespace, a["name"], a["spec"], base.get("spec")))
        except A.SpecProblem:
            continue
    return out


async def announce(rt: Runtime, base: dict, desired: dict, result: str) -> None:
    """An Event on the base when an owned object was created, changed back or removed."""
    if result in ("created", "patched", "deleted"):
        verb = {"created": "Created", "patched": "Updated", "deleted": "Deleted"}[result]
        await post_events(rt, base, [("Normal", verb, f"{verb.lower()} {desired['kind']} "
                                                      f"{desired['metadata']['name']}")])


async def ensure_configmap(rt: Runtime, base: dict, adapters: Adapters,
                           phases: dict[str, str] | None = None, exclude: str | None = None) -> str:
    meta = base["metadata"]
    async with rt.lock(("configmap", meta["namespace"], meta["name"])):
        current = [a for a in _now(adapters) if a["name"] != exclude]
        manifests = await adapter_manifests(rt, meta["namespace"], base, current, phases)
        # Only preload adapters travel in the ConfigMap (see render.render_configmap).
        desired = render.render_configmap(base, [m for m in manifests if m.preload])
        result = await apply.ensure(rt.kube, desired)
    for m in manifests:
        rt.configmap_digests[(meta["namespace"], m.name)] = A.manifest_digest(m)
    await announce(rt, base, desired, result)
    return result


async def ensure_deployment(rt: Runtime, base: dict) -> str:
    meta = base["metadata"]
    spec = render.with_defaults(base.get("spec"))
    ref = Ref("apps/v1", "deployments", meta["namespace"], meta["name"])
    async with rt.lock(("deployment", meta["namespace"], meta["name"])):
        live = await rt.kube.get(ref)
        if not spec["autoscaling"]["enabled"]:
            desired = render.render_deployment(base, render.deployment_replicas(spec, None))
            result = await apply.ensure(rt.kube, desired, live)
        else:
            # Under autoscaling the autoscaler owns the replica count: render it only to create
            # the Deployment or to bring it back inside [minReplicas, maxReplicas].
            observed = ((live or {}).get("spec") or {}).get("replicas")
            held = render.deployment_replicas(spec, observed)
            replicas = held if observed is not None and held != observed else None
            desired = render.render_deployment(base, replicas)
            result = await apply.ensure(rt.kube, desired, live, on_create={"spec": {"replicas": held}},
                                        keep=frozenset({("spec", "replicas")}))
    await announce(rt, base, desired, result)
    return result


async def ensure_service(rt: Runtime, base: dict) -> str:
    desired = render.render_service(base)
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return result


async def ensure_ingress(rt: Runtime, base: dict) -> str:
    meta = base["metadata"]
    desired = render.render_ingress(base)
    if desired is None:
        ref = Ref("networking.k8s.io/v1", "ingresses", meta["namespace"], meta["name"])
        result = "deleted" if await apply.remove(rt.kube, ref, meta.get("uid")) else "unchanged"
        await announce(rt, base, {"kind": "Ingress", "metadata": {"name": meta["name"]}}, result)
        return result
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return result


async def reconcile_base(rt: Runtime, base: dict, pods: list[S.PodView], adapters: Adapters) -> None:
    """One level-triggered pass over a BaseModelDeployment: owned objects, then status."""
    meta = base["metadata"]
    if meta.get("deletionTimestamp"):
        return
    render_error = None
    try:
        await ensure_configmap(rt, base, adapters)
        await ensure_deployment(rt, base)
        await ensure_service(rt, base)
        await ensure_ingress(rt, base)
    except ValueError as e:
        render_error = str(e)
    dep = await rt.kube.get(Ref("apps/v1", "deployments", meta["namespace"], meta["name"]))
    spec = render.with_defaults(base.get("spec"))
    desired = ((dep or {}).get("spec") or {}).get("replicas")
    if desired is None:
        desired = render.deployment_replicas(spec, None)
    new = S.base_status(
        bmd=base, pods=pods, desired_replicas=int(desired),
        adapters=sum(1 for a in _now(adapters) if not a.get("deleting")),
        endpoint=render.endpoint(base), selector=C.selector_string(meta["name"]),
        deployment=dep, render_error=render_error,
        old=current_status(rt, bmd_ref(meta["namespace"], meta["name"]), base))
    await write_status(rt, bmd_ref(meta["namespace"], meta["name"]), base, new, S.base_events)


# --- LoraAdapter -------------------------------------------------------------------------------

def _seed(rt: Runtime, key: tuple[str, str], old_status: dict) -> dict[str, PodRecord]:
    if key not in rt.records:
        digest = old_status.get("manifestDigest")
        rt.records[key] = {p["name"]: PodRecord.from_entry(p, digest) for p in old_status.get("pods") or []
                           if p.get("name")}
    return rt.records[key]


async def _unload_everywhere(rt: Runtime, name: str, pods: Iterable[S.PodView], token: str | None) -> list[str]:
    """DELETE the adapter from each pod that has an address; returns the pods that failed."""
    async def one(p: S.PodView) -> str | None:
        try:
            await rt.engine.delete_adapter(p.ip, p.port, name, token)  # type: ignore[arg-type]
            return None
        except (EngineError, EngineUnreachable) as e:
            return f"{p.name}: {e}"
    results = await asyncio.gather(*(one(p) for p in pods if p.ip and not p.deleting))
    return [r for r in results if r]


async def reconcile_adapter(rt: Runtime, body: dict, base: dict | None, base_adapters: Adapters,
                            pods: list[S.PodView]) -> float:
    """One pass over a LoraAdapter: accept it, keep the ConfigMap right, push to every ready
    engine pod, write status. Returns the seconds until the next pass."""
    meta, spec = body["metadata"], body.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    key = (ns, name)
    cfg = rt.config
    if meta.get("deletionTimestamp"):
        return cfg.resync_interval
    old = current_status(rt, lora_ref(ns, name), body)
    generation = meta.get("generation")
    try:
        manifest = await desired_manifest(rt, ns, name, spec, base.get("spec") if base else None)
        token = await engine_token(rt, ns, base)
    except A.SpecProblem as problem:
        # Not accepted: not served. Unload it where this operator had pushed it.
        pushed = _seed(rt, key, old)  # in memory, or what the status says from before a restart
        rt.records.pop(key, None)
        if pushed:
            by_name = {p.name: p for p in pods}
            await _unload_everywhere(rt, name, [by_name[n] for n in pushed if n in by_name],
                                     await _token_or_none(rt, ns, base))
        if base is not None and rt.configmap_digests.pop(key, None) is not None:
            await ensure_configmap(rt, base, base_adapters)
        phase = "Pending" if problem.reason in PENDING_REASONS else "Failed"
        new = S.adapter_status(generation=generation, accepted=(False, problem.reason, problem.message),
                               pods=[], digest=None, max_failures=cfg.max_failures, old=old,
                               problem_phase=phase)
        new["manifestDigest"] = None
        await write_status(rt, lora_ref(ns, name), body, new, S.adapter_events)
        return cfg.resync_interval

    assert base is not None
    digest = A.manifest_digest(manifest)
    if rt.configmap_digests.get(key) != digest:
        await ensure_configmap(rt, base, base_adapters)
    records = _seed(rt, key, old)
    outcomes = await sync_pods(rt.engine, pods, records, A.manifest_json(manifest), digest, cfg, token)
    # Remember every pod that still exists (a restarting one comes back with a new boot id);
    # the status lists the pods that took part in this pass.
    present = {p.name for p in pods if not p.deleting}
    kept = {pod: r for pod, r in records.items() if pod in present}
    kept.update({pod: o.record for pod, o in outcomes.items()})
    rt.records[key] = kept
    restarts = []
    for pod, o in outcomes.items():
        if any(a not in ("poll", "wait") for a in o.actions):
            log.info("adapter %s/%s on pod %s: %s -> %s %s", ns, name, pod, ",".join(o.actions),
                     o.record.state, o.record.message)
        if "restarted" in o.actions:
            restarts.append(("Normal", "PodRestarted", f"engine in pod {pod} restarted (boot id "
                                                       f"{o.record.boot_id}); adapter pushed again"))
    new = S.adapter_status(generation=generation, accepted=(True, "Accepted", ""),
                           pods=[o.record.entry() for o in outcomes.values()], digest=digest,
                           max_failures=cfg.max_failures, old=old)
    await write_status(rt, lora_ref(ns, name), body, new, S.adapter_events)
    await post_events(rt, body, restarts)
    if (old.get("phase") == "Failed") != (new["phase"] == "Failed"):
        # Entering or leaving Failed changes the ConfigMap's membership.
        await ensure_configmap(rt, base, base_adapters, phases={name: new["phase"]})
    return next_wakeup({pod: o.record for pod, o in outcomes.items()}, cfg, time.monotonic())


async def unload_adapter(rt: Runtime, body: dict, base: dict | None, base_adapters: Adapters,
                         pods: list[S.PodView]) -> list[str]:
    """On deletion: out of the ConfigMap, then DELETE from every engine pod of the base.
    Returns the pods that could not be reached (the caller retries a bounded number of times)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    rt.records.pop((ns, name), None)
    if base is not None:
        try:
            await ensure_configmap(rt, base, base_adapters, exclude=name)
        except ApiError as e:
            if e.status != 404:
                raise
    rt.configmap_digests.pop((ns, name), None)
    return await _unload_everywhere(rt, name, pods, await _token_or_none(rt, ns, base))


# --- autoscaling -------------------------------------------------------------------------------

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


async def autoscale_base(rt: Runtime, base: dict, pods: list[S.PodView], now: float | None = None) -> Any:
    meta = base["metadata"]
    ns, name = meta["namespace"], meta["name"]
    spec = render.with_defaults(base.get("spec"))
    if not spec["autoscaling"]["enabled"] or meta.get("deletionTimestamp"):
        rt.scale_history.pop((ns, name), None)
        return None
    dep_ref = Ref("apps/v1", "deployments", ns, name)
    dep = await rt.kube.get(dep_ref)
    if dep is None:
        return None
    current = int((dep.get("spec") or {}).get("replicas", 1))
    policy = Policy.from_spec(spec["autoscaling"])
    samples = await scrape(rt, pods, policy.metric)
    decision = decide(current, samples, policy, rt.scale_history.get((ns, name), ()),
                      time.monotonic() if now is None else now)
    rt.scale_history[(ns, name)] = decision.history
    if decision.desired == current:
        return decision
    await rt.kube.patch(dep_ref, {"spec": {"replicas": decision.desired}})
    await rt.kube.patch_status(bmd_ref(ns, name), {"desiredReplicas": decision.desired,
                                                   "lastScaleTime": S.now_iso()})
    await post_events(rt, base, [("Normal", "Scaled", f"{current} -> {decision.desired} replicas: "
                                                        f"{decision.reason}")])
    log.info("scaled %s/%s from %d to %d: %s", ns, name, current, decision.desired, decision.reason)
    return decision
