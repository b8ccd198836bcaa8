"""The reconcile steps the kopf handlers call: owned objects, the adapters ConfigMap, adapter
pushes, status and Events. Level-triggered: each step reads what is, compares it with what
should be, and writes only the difference.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import adapters as A
from . import apply
from . import constants as C
from . import metrics
from . import placement as P
from . import render
from . import status as S
from .autoscale import METRICS, Policy, decide, parse_metric
from .fleet import PodMemory, PodPass, PodRecord, sync_pod
from .engine_client import EngineError, EngineUnreachable
from .kube import ApiError, Ref
from .runtime import Runtime

log = logging.getLogger("loraplex.operator")

PENDING_REASONS = frozenset({"BaseNotFound", "SecretNotFound", "SecretKeyNotFound"})

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


async def write_status(rt: Runtime, ref: Ref, body: dict, new: dict, events, old: dict | None = None) -> bool:
    """Patch the status when it differs; post the Events of the transition. True if written."""
    old = current_status(rt, ref, body) if old is None else old
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
    salt = A.tenant_salt(namespace, spec.get("baseModel", ""))
    return A.build_manifest(name, spec, A.tenant_hashes(refs, secrets, salt))


async def engine_token(rt: Runtime, namespace: str, base: dict | None) -> str | None:
    """The admin token the base's engines require (None without a base)."""
    if base is None:
        return None
    ref = A.admin_token_ref(base.get("spec"), base["metadata"]["name"])
    return A.admin_token(ref, await rt.get_secret(namespace, ref.name))


async def _token_or_none(rt: Runtime, namespace: str, base: dict | None) -> str | None:
    try:
        return await engine_token(rt, namespace, base)
    except A.SpecProblem:
        return None


async def ensure_admin_secret(rt: Runtime, base: dict) -> str:
    """Create the base's admin-token Secret when its spec names none (secure by default).
    Created once with a random token, never rewritten."""
    meta = base["metadata"]
    if ((base.get("spec") or {}).get("engine") or {}).get("adminTokenSecretRef"):
        return "unchanged"
    name = C.admin_secret_name(meta["name"])
    if await rt.get_secret(meta["namespace"], name) is not None:
        return "unchanged"
    desired = render.render_admin_secret(base, secrets.token_urlsafe(32))
    try:
        await rt.kube.create(Ref("v1", "secrets", meta["namespace"], name), desired)
    except ApiError as e:
        if e.status != 409:
            raise
    rt.forget_secret(meta["namespace"], name)
    await announce(rt, base, desired, "created")
    return "created"


async def inference_pool_available(rt: Runtime) -> bool:
    """Whether the InferencePool CRD is installed (API discovery, cached for a resync interval)."""
    now = time.monotonic()
    if rt.pool_discovery is not None and now - rt.pool_discovery[0] < max(rt.config.resync_interval, 5.0):
        return rt.pool_discovery[1]
    try:
        found = await rt.kube.has_resource(render.INFERENCE_POOL_API, "inferencepools")
    except ApiError as e:
        log.warning("API discovery of %s failed: %s", render.INFERENCE_POOL_API, e)
        found = rt.pool_discovery[1] if rt.pool_discovery else False
    rt.pool_discovery = (now, found)
    return found


async def ensure_inference_pool(rt: Runtime, base: dict) -> dict:
    """Render the base's InferencePool where the CRD is installed; the condition that says so."""
    desired = render.render_inference_pool(base)
    if desired is None:
        return S.condition("InferencePool", False, "Disabled", "spec.inferencePool.enabled is false")
    if not await inference_pool_available(rt):
        return S.condition("InferencePool", False, "CRDNotInstalled",
                           f"{render.INFERENCE_POOL_API} InferencePool is not installed in the cluster: skipped "
                           "(install the Gateway API Inference Extension CRDs to route by LoRA affinity)")
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return S.condition("InferencePool", True, "Rendered",
                       f"InferencePool {desired['metadata']['name']} selects the engine pods; endpoint picker "
                       f"{desired['spec']['endpointPickerRef']['name']}:"
                       f"{desired['spec']['endpointPickerRef']['port']['number']}")


async def announce(rt: Runtime, base: dict, desired: dict, result: str) -> None:
    """An Event on the base when an owned object was created, changed back or removed."""
    if result in ("created", "patched", "deleted"):
        verb = {"created": "Created", "patched": "Updated", "deleted": "Deleted"}[result]
        await post_events(rt, base, [("Normal", verb, f"{verb.lower()} {desired['kind']} "
                                                      f"{desired['metadata']['name']}")])


async def ensure_configmap(rt: Runtime, base: dict, preload: list) -> str:
    """The `<base>-adapters` ConfigMap with the preload manifests (render.render_configmap)."""
    desired = render.render_configmap(base, preload)
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return result


async def ensure_deployment(rt: Runtime, base: dict) -> str:
    meta = base["metadata"]
    spec = render.with_defaults(base.get("spec"))
    ref = Ref("apps/v1", "deployments", meta["namespace"], meta["name"])
    async with rt.lock(("deployment", meta["namespace"], meta["name"])):
        live = await rt.kube.get(ref)
        if not spec["autoscaling"]["enabled"]:
            desired = render.render_deployment(base, render.deployment_replicas(spec, None), rt.catalog_url,
                                               rt.engine_images)
            result = await apply.ensure(rt.kube, desired, live)
        else:
            # Under autoscaling the autoscaler owns the replica count: render it only to create
            # the Deployment or to bring it back inside [minReplicas, maxReplicas].
            observed = ((live or {}).get("spec") or {}).get("replicas")
            held = render.deployment_replicas(spec, observed)
            replicas = held if observed is not None and held != observed else None
            desired = render.render_deployment(base, replicas, rt.catalog_url, rt.engine_images)
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


@dataclass
class Accepted:
    """The adapters of a base, sorted out for one pass."""

    manifests: dict[str, Any] = field(default_factory=dict)       # name -> AdapterManifest
    problems: dict[str, A.SpecProblem] = field(default_factory=dict)
    managed: set[str] = field(default_factory=set)                 # every adapter name of the base


async def accept_adapters(rt: Runtime, base: dict, adapters: list[dict]) -> Accepted:
    """Validate each adapter of the base and build its manifest. A manifest is rebuilt only
    when the adapter's spec changed or its Secrets' cache entries expired."""
    ns = base["metadata"]["namespace"]
    out = Accepted()
    base_spec = base.get("spec") or {}
    for a in adapters:
        out.managed.add(a["name"])
        # `unloaded`: deleted by its finalizer handler while this pass's snapshot still had it
        if a.get("deleting") or a.get("uid") in rt.unloaded:
            continue
        key = (ns, a["name"])
        stamp = (apply.canonical(a["spec"]), apply.canonical(base_spec.get("engine", {}).get("maxLoraRank")),
                 int(time.monotonic() // rt.secret_ttl))
        hit = rt.manifests.get(key)
        if hit is None or hit[0] != stamp:
            try:
                hit = (stamp, await desired_manifest(rt, ns, a["name"], a["spec"], base_spec))
            except A.SpecProblem as problem:
                hit = (stamp, problem)
            rt.manifests[key] = hit
        if isinstance(hit[1], A.SpecProblem):
            out.problems[a["name"]] = hit[1]
        else:
            out.manifests[a["name"]] = hit[1]
    return out


def _withdrawn(a: dict) -> bool:
    """A preload adapter that Failed on every pod leaves the ConfigMap, so that new pods do
    not trip over it; a spec change (a new generation) admits it again."""
    st = a.get("status") or {}
    return st.get("phase") == "Failed" and st.get("observedGeneration") == a.get("generation")


async def reconcile_base(rt: Runtime, base: dict, pods: list[S.PodView], adapters: list[dict]) -> float:
    """One level-triggered pass over a BaseModelDeployment: owned objects, the adapters onto
    their pods, then the base's status. Returns the seconds until the next pass."""
    meta = base["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return rt.config.resync_interval
    started = time.monotonic()
    # An adapter's deletion handler DELETEs it from the pods under this lock, so a pass that took
    # its snapshot before the deletion cannot PUT it back afterwards (the adapter would then be no
    # longer managed, and nothing would remove it again); passes after it skip its uid (rt.unloaded).
    async with rt.lock(("adapters", ns, name)):
        accepted = await accept_adapters(rt, base, adapters)
        by_name = {a["name"]: a for a in adapters}
        preload = [m for n, m in accepted.manifests.items() if m.preload and not _withdrawn(by_name[n])]
        # The owned objects are applied when something they depend on changed (the base's spec, the
        # preload set, an event on one of them), and once per resync interval to repair drift;
        # not on every pass (a pass woken by adapter changes has nothing to do with them).
        stamp = (apply.canonical(base.get("spec")), tuple(sorted(A.manifest_digest(m) for m in preload)))
        last = rt.owned_applied.get((ns, name))
        now = time.monotonic()
        if last is not None and last[0] == stamp and now - last[1] < rt.config.resync_interval \
                and (ns, name) not in rt.owned_stale:
            pool_condition, dep, render_error = last[2], last[3], last[4]
        else:
            rt.owned_stale.discard((ns, name))
            render_error = None
            pool_condition = None
            try:  # a spec the pod policy refuses gets nothing applied, and phase Failed
                render.check_spec(base.get("spec"), rt.engine_images)
                await ensure_admin_secret(rt, base)
                await ensure_configmap(rt, base, preload)
                await ensure_deployment(rt, base)
                await ensure_service(rt, base)
                await ensure_ingress(rt, base)
                pool_condition = await ensure_inference_pool(rt, base)
            except ValueError as e:
                render_error = str(e)
            dep = await rt.kube.get(Ref("apps/v1", "deployments", ns, name))
            rt.owned_applied[(ns, name)] = (stamp, now, pool_condition, dep, render_error)
        delay = await sync_adapters(rt, base, adapters, accepted, pods)
    spec = render.with_defaults(base.get("spec"))
    desired = ((dep or {}).get("spec") or {}).get("replicas")
    if desired is None:
        desired = render.deployment_replicas(spec, None)
    new = S.base_status(
        bmd=base, pods=pods, desired_replicas=int(desired),
        adapters=sum(1 for a in adapters if not a.get("deleting")),
        endpoint=render.endpoint(base), selector=C.selector_string(name),
        deployment=dep, render_error=render_error,
        old=current_status(rt, bmd_ref(ns, name), base),
        extra_conditions=[pool_condition] if pool_condition else [],
        admin_secret=A.admin_token_ref(base.get("spec"), name).name)
    await write_status(rt, bmd_ref(ns, name), base, new, S.base_events)
    metrics.RECONCILE_SECONDS.labels(kind="BaseModelDeployment").observe(time.monotonic() - started)
    return delay


# --- LoraAdapters of a base onto its pods ------------------------------------------------------

def _seed(rt: Runtime, key: tuple[str, str], old_status: dict) -> dict[str, PodRecord]:
    if key not in rt.records:
        digest = old_status.get("manifestDigest")
        rt.records[key] = {p["name"]: PodRecord.from_entry(p, digest) for p in old_status.get("pods") or []
                           if p.get("name")}
    return rt.records[key]


def adapter_body(ns: str, a: dict) -> dict:
    """What an Event about a LoraAdapter needs to name it."""
    return {"apiVersion": C.API_VERSION, "kind": C.LORA_KIND,
            "metadata": {"name": a["name"], "namespace": ns, "uid": a.get("uid")}, "status": a.get("status") or {}}


async def sync_adapters(rt: Runtime, base: dict, adapters: list[dict], accepted: Accepted,
                        pods: list[S.PodView]) -> float:
    """Place the accepted adapters on the pods, bring every pod to its placed set (one listing
    per pod, pushes only for what differs), then write the adapters' statuses that changed.
    Returns the seconds until the next pass."""
    cfg = rt.config
    meta = base["metadata"]
    ns, bname = meta["namespace"], meta["name"]
    base_spec = base.get("spec") or {}
    token = await _token_or_none(rt, ns, base)
    by_name = {a["name"]: a for a in adapters}

    targets = [p for p in pods if p.candidate]
    wants, previous = [], {}
    for name, m in accepted.manifests.items():
        a = by_name[name]
        replicas, policy = P.resolve(a["spec"].get("placement"), base_spec.get("placement"), m.preload)
        wants.append(P.Want(name, replicas, policy))
        previous[name] = rt.placements.get((ns, name)) or (a.get("status") or {}).get("placement") or []
    placed = P.place(wants, [p.name for p in targets], previous)
    for name, where in placed.items():
        rt.placements[(ns, name)] = where
    per_pod = P.by_pod(placed)
    payload = {name: (A.manifest_json(m), A.manifest_digest(m)) for name, m in accepted.manifests.items()}
    records = {name: _seed(rt, (ns, name), by_name[name].get("status") or {}) for name in accepted.manifests}

    push_limit = asyncio.Semaphore(cfg.push_concurrency)
    pod_limit = asyncio.Semaphore(cfg.pod_concurrency)

    async def one(pod: S.PodView) -> PodPass:
        mine = per_pod.get(pod.name, set())
        async with pod_limit:
            return await sync_pod(rt.engine, pod, rt.pod_memory.setdefault((ns, bname, pod.name), PodMemory()),
                                  {n: payload[n] for n in mine},
                                  {n: records[n][pod.name] for n in mine if pod.name in records[n]},
                                  accepted.managed, cfg, token, push_limit)

    passes = await asyncio.gather(*(one(p) for p in targets))
    took_part = {p.pod for p in passes if p.took_part}
    calls = sum(p.calls for p in passes)
    for p in passes:
        metrics.PUSHES.labels(result="ok").inc(len(p.pushed) + len(p.retried))
        metrics.PUSHES.labels(result="error").inc(p.failed_pushes)
        for name, rec in p.records.items():
            records[name][p.pod] = rec
    live = {p.name for p in pods if not p.deleting}
    for name in records:
        records[name] = {pod: r for pod, r in records[name].items() if pod in live}
        rt.records[(ns, name)] = records[name]
    for key in [k for k in rt.pod_memory if k[:2] == (ns, bname) and k[2] not in live]:
        rt.pod_memory.pop(key, None)

    events_on_base: list[tuple[str, str, str]] = []
    restarted = sorted(p.pod for p in passes if p.restarted)
    for pod in restarted:
        events_on_base.append(("Normal", "PodRestarted", f"engine in pod {pod} restarted (boot id "
                                                          f"{next(p.boot_id for p in passes if p.pod == pod)}); "
                                                          "its placed adapters were pushed again"))
    pushed = sum(len(p.pushed) + len(p.retried) for p in passes)
    removed = sum(len(p.removed) for p in passes)
    if pushed or removed:
        log.info("base %s/%s: pushed %d, removed %d adapter registrations over %d pods (%d engine calls)",
                 ns, bname, pushed, removed, len(passes), calls)
    rt.last_pass[(ns, bname)] = {"engine_calls": calls, "pods": len(passes), "pushed": pushed, "removed": removed}
    metrics.ENGINE_CALLS.labels(namespace=ns, base=bname).set(calls)

    # Statuses: computed for every adapter, written only where they differ.
    now_mono = time.monotonic()
    delay = cfg.resync_interval
    transitions: dict[str, list[str]] = {}
    writes = []
    for a in adapters:
        name = a["name"]
        if a.get("deleting"):
            continue
        old = current_status(rt, lora_ref(ns, name), adapter_body(ns, a))
        if name in accepted.problems:
            problem = accepted.problems[name]
            rt.records.pop((ns, name), None)
            rt.placements.pop((ns, name), None)
            phase = "Pending" if problem.reason in PENDING_REASONS else "Failed"
            new = S.adapter_status(generation=a.get("generation"), accepted=(False, problem.reason, problem.message),
                                   pods=[], digest=None, max_failures=cfg.max_failures, old=old, problem_phase=phase)
            new["manifestDigest"] = None
            new["placement"] = []
        else:
            where = placed.get(name, [])
            recs = [records[name][pod] for pod in where if pod in took_part and pod in records[name]]
            # A placed pod that is not Ready and does not answer yet (starting, restarting) is
            # listed as such: the adapter is not warm there.
            waiting = [{"name": pod, "state": "unknown", "message": "engine pod not ready", "failures": 0}
                       for pod in where if pod not in took_part]
            new = S.adapter_status(generation=a.get("generation"), accepted=(True, "Accepted", ""),
                                   pods=[r.entry() for r in recs] + waiting, digest=payload[name][1],
                                   max_failures=cfg.max_failures, old=old)
            new["placement"] = list(where)
            delay = min(delay, next_wakeup(recs, cfg, now_mono))
        if old.get("phase") != new["phase"]:
            transitions.setdefault(new["phase"], []).append(name)
        writes.append((a, old, new))

    limit = asyncio.Semaphore(cfg.status_concurrency)

    async def write(a: dict, old: dict, new: dict) -> None:
        async with limit:
            try:
                await write_status(rt, lora_ref(ns, a["name"]), adapter_body(ns, a), new, S.adapter_warnings,
                                   old=old)
            except ApiError as e:
                if e.status != 404:  # deleted meanwhile: nothing to report on
                    log.warning("status of adapter %s/%s not written: %s", ns, a["name"], e)

    await asyncio.gather(*(write(*w) for w in writes if S.differs(w[1], w[2])))
    for phase, names in sorted(transitions.items()):
        names.sort()
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        kind = "Warning" if phase in ("Failed", "Degraded") else "Normal"
        events_on_base.append((kind, f"Adapters{phase}", f"{len(names)} adapter(s) now {phase}: {shown}"))
    await post_events(rt, base, events_on_base)
    counts: dict[str, int] = {}
    for a, old, new in writes:
        counts[new["phase"]] = counts.get(new["phase"], 0) + 1
    rt.phase_counts[(ns, bname)] = counts
    metrics.set_adapter_phases(rt.phase_counts)
    return delay


def next_wakeup(records: Iterable[PodRecord], cfg, now: float) -> float:
    """Seconds until the next pass should look at these records again."""
    delay = cfg.resync_interval
    for r in records:
        if r.state == C.STATE_LOADING or (r.state == C.STATE_REGISTERED and not r.verified):
            delay = min(delay, cfg.poll_interval)
        if r.next_attempt and r.state in (C.STATE_UNREACHABLE, C.STATE_FAILED):
            delay = min(delay, max(r.next_attempt - now, 0.05))
    return max(delay, 0.05)


async def reconcile_orphan(rt: Runtime, body: dict) -> None:
    """A LoraAdapter whose base does not exist (yet: GitOps applies in any order): Pending."""
    meta, spec = body["metadata"], body.get("spec") or {}
    if meta.get("deletionTimestamp"):
        return
    ref = lora_ref(meta["namespace"], meta["name"])
    old = current_status(rt, ref, body)
    try:
        A.validate(meta["name"], spec, None)
        raise AssertionError("unreachable: a missing base is a SpecProblem")
    except A.SpecProblem as problem:
        new = S.adapter_status(generation=meta.get("generation"), accepted=(False, problem.reason, problem.message),
                               pods=[], digest=None, max_failures=rt.config.max_failures, old=old,
                               problem_phase="Pending" if problem.reason in PENDING_REASONS else "Failed")
    new["manifestDigest"] = None
    new["placement"] = []
    rt.records.pop((meta["namespace"], meta["name"]), None)
    await write_status(rt, ref, body, new, S.adapter_warnings)


async def unload_adapter(rt: Runtime, body: dict, base: dict | None, pods: list[S.PodView]) -> list[str]:
    """On deletion: DELETE the adapter from every engine pod of the base. Returns the pods that
    could not be reached (the caller retries a bounded number of times)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    token = await _token_or_none(rt, ns, base)

    async def one(p: S.PodView) -> str | None:
        try:
            await rt.engine.delete_adapter(p.ip, p.port, name, token)  # type: ignore[arg-type]
            return None
        except (EngineError, EngineUnreachable) as e:
            return f"{p.name}: {e}"
    # Not while the base's pass pushes: that pass may still hold this adapter as placed (see
    # reconcile_base). A pass after this one may still work from a snapshot taken before the
    # deletion: the uid noted in rt.unloaded keeps it from pushing the adapter back.
    base_name = ((base or {}).get("metadata") or {}).get("name") or (body.get("spec") or {}).get("baseModel")
    async with rt.lock(("adapters", ns, base_name)):
        rt.forget_unloaded(meta.get("uid"))
        rt.records.pop((ns, name), None)
        rt.placements.pop((ns, name), None)
        rt.manifests.pop((ns, name), None)
        results = await asyncio.gather(*(one(p) for p in pods if p.ip and not p.deleting))
    return [r for r in results if r]


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
    now = time.monotonic() if now is None else now
    if (ns, name) not in rt.scale_history:
        # A fresh operator (a restart, a new leader) knows no history: seed it with the current
        # size, so that no scale-down happens before a whole down-window of its own samples.
        rt.scale_history[(ns, name)] = ((now, current),)
    decision = decide(current, samples, policy, rt.scale_history[(ns, name)], now)
    rt.scale_history[(ns, name)] = decision.history
    if decision.desired == current:
        return decision
    await rt.kube.patch(dep_ref, {"spec": {"replicas": decision.desired}})
    await rt.kube.patch_status(bmd_ref(ns, name), {"desiredReplicas": decision.desired,
                                                   "lastScaleTime": S.now_iso()})
    metrics.AUTOSCALER.labels(direction="up" if decision.desired > current else "down").inc()
    await post_events(rt, base, [("Normal", "Scaled", f"{current} -> {decision.desired} replicas: "
                                                        f"{decision.reason}")])
    log.info("scaled %s/%s from %d to %d: %s", ns, name, current, decision.desired, decision.reason)
    return decision
