"""The objects a base owns: admin-token Secret, `<base>-adapters` ConfigMap, Deployment, Service,
Ingress, InferencePool, and when it scales to zero its HTTPScaledObject and `<base>-wake` Service
(scaletozero.py). Their only writer is the base's pass (reconcile.py), on the leader.

Applied when something they depend on changed (the base's spec, the preload set, an event on the
Deployment) and once per resync interval to repair drift; a pass woken by adapter changes makes
no request about them. OwnedState remembers, per base, what the last application found.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import adapters as A
from . import apply
from . import constants as C
from . import render
from . import scaletozero as Z
from . import status as S
from .constants import Key
from .kube import ApiError, Ref
from .publish import post_events

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("loraplex.operator")


@dataclass(frozen=True)
class Applied:
    """What the last application of a base's owned objects found."""

    stamp: Any                           # the base's spec and preload digests it was applied for
    at: float                            # monotonic time of it
    pool_condition: dict | None          # the InferencePool condition (None: not applied)
    deployment: dict | None              # the Deployment as read after it
    render_error: str | None             # the pod policy's refusal of the spec
    zero_condition: dict | None = None   # the ScaleToZero condition (None: not asked for)
    handed_over: bool = False            # KEDA owns the replicas (scaletozero.py)


@dataclass(frozen=True)
class Discovery:
    """Whether a CRD is installed, as API discovery said at `at`."""

    at: float
    found: bool


@dataclass
class OwnedState:
    applied: dict[Key, Applied] = field(default_factory=dict)
    stale: set[Key] = field(default_factory=set)   # bases whose Deployment had an event since
    discovered: dict[str, Discovery] = field(default_factory=dict)  # "<apiVersion>/<plural>" -> discovery
    deployment_locks: dict[Key, asyncio.Lock] = field(default_factory=lambda: collections.defaultdict(asyncio.Lock))


async def announce(rt: Runtime, base: dict, desired: dict, result: str) -> None:
    """An Event on the base when an owned object was created, changed back or removed."""
    if result in ("created", "patched", "deleted"):
        verb = {"created": "Created", "patched": "Updated", "deleted": "Deleted"}[result]
        await post_events(rt.kube, base, [("Normal", verb, f"{verb.lower()} {desired['kind']} "
                                                           f"{desired['metadata']['name']}")])


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


async def crd_available(rt: Runtime, api_version: str, plural: str) -> bool:
    """Whether the cluster serves `plural` in `api_version` (API discovery, cached for a resync interval)."""
    now = time.monotonic()
    key = f"{api_version}/{plural}"
    known = rt.owned.discovered.get(key)
    if known is not None and now - known.at < max(rt.config.resync_interval, 5.0):
        return known.found
    try:
        found = await rt.kube.has_resource(api_version, plural)
    except ApiError as e:
        log.warning("API discovery of %s failed: %s", api_version, e)
        found = known.found if known else False
    rt.owned.discovered[key] = Discovery(now, found)
    return found


async def handed_over(rt: Runtime, spec: dict | None) -> bool:
    """Whether KEDA owns the base's replicas: it asks to scale to zero and the add-on is installed."""
    return Z.requested(spec) and await crd_available(rt, Z.KEDA_HTTP_API, Z.PLURAL)


async def ensure_inference_pool(rt: Runtime, base: dict) -> dict:
    """Render the base's InferencePool where the CRD is installed; the condition that says so."""
    desired = render.render_inference_pool(base)
    if desired is None:
        return S.condition("InferencePool", False, "Disabled", "spec.inferencePool.enabled is false")
    if not await crd_available(rt, render.INFERENCE_POOL_API, "inferencepools"):
        return S.condition("InferencePool", False, "CRDNotInstalled",
                           f"{render.INFERENCE_POOL_API} InferencePool is not installed in the cluster: skipped "
                           "(install the Gateway API Inference Extension CRDs to route by LoRA affinity)")
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return S.condition("InferencePool", True, "Rendered",
                       f"InferencePool {desired['metadata']['name']} selects the engine pods; endpoint picker "
                       f"{desired['spec']['endpointPickerRef']['name']}:"
                       f"{desired['spec']['endpointPickerRef']['port']['number']}")


async def ensure_configmap(rt: Runtime, base: dict, preload: list) -> str:
    """The `<base>-adapters` ConfigMap with the preload manifests (render.render_configmap)."""
    desired = render.render_configmap(base, preload)
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return result


async def ensure_deployment(rt: Runtime, base: dict, handed: bool = False) -> str:
    meta = base["metadata"]
    spec = render.with_defaults(base.get("spec"))
    ref = Ref("apps/v1", "deployments", meta["namespace"], meta["name"])
    async with rt.owned.deployment_locks[Key(meta["namespace"], meta["name"])]:
        live = await rt.kube.get(ref)
        if handed:
            # KEDA owns the replica count (0 included): rendered only to create the Deployment.
            desired = render.render_deployment(base, None, rt.catalog_url, rt.engine_images)
            result = await apply.ensure(rt.kube, desired, live,
                                        on_create={"spec": {"replicas": render.deployment_replicas(spec, None, 0)}},
                                        keep=frozenset({("spec", "replicas")}))
        elif not spec["autoscaling"]["enabled"]:
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


async def ensure_scale_to_zero(rt: Runtime, base: dict, handed: bool) -> dict | None:
    """The HTTPScaledObject and the `<base>-wake` Service while KEDA holds the base's requests,
    else neither (removed when an earlier pass made them); the ScaleToZero condition."""
    meta = base["metadata"]
    ns, name = meta["namespace"], meta["name"]
    wake_ref = Ref("v1", "services", ns, Z.wake_service_name(name))
    hso_ref = Ref(Z.KEDA_HTTP_API, Z.PLURAL, ns, name)
    if handed:
        for desired in (Z.render_wake_service(base), Z.render_http_scaled_object(base)):
            await announce(rt, base, desired, await apply.ensure(rt.kube, desired))
        return Z.condition(base, True)
    installed = await crd_available(rt, Z.KEDA_HTTP_API, Z.PLURAL)
    gone = [(wake_ref, "Service")] + ([(hso_ref, Z.KIND)] if installed else [])
    for ref, kind in gone:
        if await apply.remove(rt.kube, ref, meta.get("uid")):
            await announce(rt, base, {"kind": kind, "metadata": {"name": ref.name}}, "deleted")
    return Z.condition(base, installed)


async def ensure_ingress(rt: Runtime, base: dict, handed: bool = False) -> str:
    meta = base["metadata"]
    desired = render.render_ingress(base, Z.entry(base) if handed else None)
    if desired is None:
        ref = Ref("networking.k8s.io/v1", "ingresses", meta["namespace"], meta["name"])
        result = "deleted" if await apply.remove(rt.kube, ref, meta.get("uid")) else "unchanged"
        await announce(rt, base, {"kind": "Ingress", "metadata": {"name": meta["name"]}}, result)
        return result
    result = await apply.ensure(rt.kube, desired)
    await announce(rt, base, desired, result)
    return result


async def ensure_owned(rt: Runtime, base: dict, preload: list) -> Applied:
    """Apply the base's owned objects when their inputs changed, an event made them stale, or a
    resync interval passed; otherwise what the last application found."""
    meta = base["metadata"]
    key = Key(meta["namespace"], meta["name"])
    stamp = (apply.canonical(base.get("spec")), tuple(sorted(A.manifest_digest(m) for m in preload)))
    last = rt.owned.applied.get(key)
    now = time.monotonic()
    if last is not None and last.stamp == stamp and now - last.at < rt.config.resync_interval \
            and key not in rt.owned.stale:
        return last
    rt.owned.stale.discard(key)
    render_error = None
    pool_condition = zero_condition = None
    handed = False
    try:  # a spec the pod policy refuses gets nothing applied, and phase Failed
        render.check_spec(base.get("spec"), rt.engine_images)
        handed = await handed_over(rt, base.get("spec"))
        await ensure_admin_secret(rt, base)
        await ensure_configmap(rt, base, preload)
        await ensure_deployment(rt, base, handed)
        await ensure_service(rt, base)
        zero_condition = await ensure_scale_to_zero(rt, base, handed)
        await ensure_ingress(rt, base, handed)
        pool_condition = await ensure_inference_pool(rt, base)
    except ValueError as e:
        render_error = str(e)
    dep = await rt.kube.get(Ref("apps/v1", "deployments", key.namespace, key.name))
    applied = rt.owned.applied[key] = Applied(stamp, now, pool_condition, dep, render_error, zero_condition, handed)
    return applied
