"""Adapter sync: the LoraAdapters of a base accepted into manifests, and every engine pod of the
base brought to its placed set (fleet.sync_pod per pod: one listing, pushes only for the
difference); on an adapter's deletion, its DELETE from every pod (`unload_adapter`).

SyncState is what this remembers between passes: the manifests built (rebuilt on a spec change
or when the Secret cache expires), per (adapter, pod) the PodRecord, per pod its PodMemory, the
adapters already unloaded, and what the last pass over each base did.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import adapters as A
from . import apply
from . import metrics
from . import placement as P
from . import render
from . import status as S
from .constants import Key
from .engine_client import EngineError, EngineUnreachable
from .fleet import Payload, PodMemory, PodPass, PodRecord, sync_pod
from .publish import Event

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("loraplex.operator")


@dataclass(frozen=True)
class CachedManifest:
    """An adapter's manifest (or why it has none), and the inputs it was built from."""

    stamp: Any
    result: Any  # AdapterManifest or adapters.SpecProblem


@dataclass(frozen=True)
class PassSummary:
    """What the last pass over a base did on its pods."""

    engine_calls: int
    pods: int
    pushed: int
    removed: int


@dataclass
class SyncState:
    manifests: dict[Key, CachedManifest] = field(default_factory=dict)      # per adapter
    records: dict[Key, dict[str, PodRecord]] = field(default_factory=dict)  # per adapter: pod -> record
    pods: dict[Key, dict[str, PodMemory]] = field(default_factory=dict)     # per base: pod -> memory
    unloaded: dict[str, float] = field(default_factory=dict)  # uid -> when its deletion handler unloaded it
    last_pass: dict[Key, PassSummary] = field(default_factory=dict)         # per base
    served: dict[Key, Any] = field(default_factory=dict)  # per adapter: revision_pass.ServedManifest
    planned: dict[Key, Any] = field(default_factory=dict)  # per adapter: revision_pass.Planned
    # Per base: held by a pass and by an adapter's unload (see reconcile_base and unload_adapter).
    locks: dict[Key, asyncio.Lock] = field(default_factory=lambda: collections.defaultdict(asyncio.Lock))

    def forget_unloaded(self, uid: str | None, keep_seconds: float = 600.0) -> None:
        """Note an unloaded adapter's uid; drop notes older than any pass's snapshot can be."""
        now = time.monotonic()
        for old in [u for u, t in self.unloaded.items() if now - t > keep_seconds]:
            del self.unloaded[old]
        if uid:
            self.unloaded[uid] = now

    def seed(self, key: Key, old_status: dict) -> dict[str, PodRecord]:
        """The adapter's records; after a restart, seeded from its status.pods."""
        if key not in self.records:
            digest = old_status.get("manifestDigest")
            self.records[key] = {p["name"]: PodRecord.from_entry(p, digest) for p in old_status.get("pods") or []
                                 if p.get("name")}
        return self.records[key]


@dataclass
class Accepted:
    """The adapters of a base, sorted out for one pass."""

    manifests: dict[str, Any] = field(default_factory=dict)       # name -> AdapterManifest (served: with revisions)
    placements: dict[str, P.Spec] = field(default_factory=dict)   # name -> its placement, resolved
    problems: dict[str, A.SpecProblem] = field(default_factory=dict)
    managed: set[str] = field(default_factory=set)                 # every adapter name of the base


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
    """The admin token the base's engines require (None without a base or when unreadable)."""
    if base is None:
        return None
    ref = A.admin_token_ref(base.get("spec"), base["metadata"]["name"])
    try:
        return A.admin_token(ref, await rt.get_secret(namespace, ref.name))
    except A.SpecProblem:
        return None


async def accept_adapters(rt: Runtime, base: dict, adapters: list[dict]) -> Accepted:
    """Validate each adapter of the base, build its manifest and resolve its placement. A manifest
    is rebuilt only when the adapter's spec changed or its Secrets' cache entries expired. An
    adapter the operator cannot use is a problem of its own (its status says why); the others go on."""
    ns = base["metadata"]["namespace"]
    out = Accepted()
    base_spec = base.get("spec") or {}
    default_placement = render.with_defaults(base_spec)["placement"]
    for a in adapters:
        out.managed.add(a["name"])
        # `unloaded`: deleted by its finalizer handler while this pass's snapshot still had it
        if a.get("deleting") or a.get("uid") in rt.sync.unloaded:
            continue
        key = Key(ns, a["name"])
        stamp = (apply.canonical(a["spec"]), apply.canonical(base_spec.get("engine", {}).get("maxLoraRank")),
                 int(time.monotonic() // rt.secret_ttl))
        hit = rt.sync.manifests.get(key)
        if hit is None or hit.stamp != stamp:
            try:
                hit = CachedManifest(stamp, await desired_manifest(rt, ns, a["name"], a["spec"], base_spec))
            except A.SpecProblem as problem:
                hit = CachedManifest(stamp, problem)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # a spec no schema check caught
                hit = CachedManifest(stamp, A.SpecProblem("InvalidSpec", f"the spec cannot be used: {e}"))
            rt.sync.manifests[key] = hit
        problem = hit.result if isinstance(hit.result, A.SpecProblem) else None
        if problem is None:
            try:
                out.placements[a["name"]] = P.resolve(a["spec"].get("placement"), default_placement,
                                                      hit.result.preload)
            except A.SpecProblem as e:
                problem = e
        if problem is not None:
            out.problems[a["name"]] = problem
            # Not accepted: placed nowhere, and its records start afresh once it is.
            rt.sync.records.pop(key, None)
            rt.placements.forget(key)
        else:
            out.manifests[a["name"]] = hit.result
    return out


def withdrawn(a: dict) -> bool:
    """A preload adapter that Failed on every pod leaves the ConfigMap, so that new pods do
    not trip over it; a spec change (a new generation) admits it again."""
    st = a.get("status") or {}
    return st.get("phase") == "Failed" and st.get("observedGeneration") == a.get("generation")


def preload_manifests(accepted: Accepted, adapters: list[dict]) -> list:
    """The manifests the base's ConfigMap carries: the preload adapters not withdrawn."""
    by_name = {a["name"]: a for a in adapters}
    return [m for n, m in accepted.manifests.items() if m.preload and not withdrawn(by_name[n])]


@dataclass
class PodSync:
    """What bringing the pods to their placed sets found: per adapter its records on the live
    pods, the pods that took part, the manifests' digests, the Events on the base."""

    records: dict[str, dict[str, PodRecord]]
    took_part: set[str]
    digests: dict[str, str]
    events: list[Event]


async def sync_pods(rt: Runtime, base: dict, adapters: list[dict], accepted: Accepted,
                    placed: dict[str, list[str]], pods: list[S.PodView]) -> PodSync:
    """Bring every candidate pod to its placed set, concurrently (cfg.pod_concurrency pods,
    cfg.push_concurrency requests in flight over all of them)."""
    cfg = rt.config
    ns, bname = base["metadata"]["namespace"], base["metadata"]["name"]
    bkey = Key(ns, bname)
    token = await engine_token(rt, ns, base)
    by_name = {a["name"]: a for a in adapters}
    per_pod = P.by_pod(placed)
    payload = {name: Payload(A.manifest_json(m), A.manifest_digest(m)) for name, m in accepted.manifests.items()}
    records = {name: rt.sync.seed(Key(ns, name), by_name[name].get("status") or {}) for name in accepted.manifests}
    memory = rt.sync.pods.setdefault(bkey, {})
    # Make-before-break: an adapter not yet servable on every pod of its placement stays on the
    # pods it is leaving (this pass pushes it to the new ones; a later pass removes the old copies).
    settled = P.settled(placed, lambda name, pod: pod in records[name] and records[name][pod].servable)
    moving = {name for name in accepted.manifests if name not in settled}

    push_limit = asyncio.Semaphore(cfg.push_concurrency)
    pod_limit = asyncio.Semaphore(cfg.pod_concurrency)

    async def one(pod: S.PodView) -> PodPass:
        mine = per_pod.get(pod.name, set())
        async with pod_limit:
            return await sync_pod(rt.engine, pod, memory.setdefault(pod.name, PodMemory()),
                                  {n: payload[n] for n in mine},
                                  {n: records[n][pod.name] for n in mine if pod.name in records[n]},
                                  accepted.managed, cfg, token, push_limit, moving)

    passes = await asyncio.gather(*(one(p) for p in pods if p.candidate))
    calls = sum(p.calls for p in passes)
    for p in passes:
        metrics.PUSHES.labels(result="ok").inc(len(p.pushed) + len(p.retried))
        metrics.PUSHES.labels(result="error").inc(p.failed_pushes)
        for name, rec in p.records.items():
            records[name][p.pod] = rec
    live = {p.name for p in pods if not p.deleting}
    for name in records:
        # Records of the placed pods only: a pod an adapter left and comes back to starts afresh
        # (its old record would claim it servable there before the push).
        where = set(placed.get(name, ()))
        records[name] = {pod: r for pod, r in records[name].items() if pod in live and pod in where}
        rt.sync.records[Key(ns, name)] = records[name]
    for pod in [p for p in memory if p not in live]:
        memory.pop(pod, None)

    events: list[Event] = []
    for p in sorted((p for p in passes if p.restarted), key=lambda p: p.pod):
        events.append(("Normal", "PodRestarted", f"engine in pod {p.pod} restarted (boot id {p.boot_id}); "
                                                 "its placed adapters were pushed again"))
    pushed = sum(len(p.pushed) + len(p.retried) for p in passes)
    removed = sum(len(p.removed) for p in passes)
    if pushed or removed:
        log.info("base %s/%s: pushed %d, removed %d adapter registrations over %d pods (%d engine calls)",
                 ns, bname, pushed, removed, len(passes), calls)
    rt.sync.last_pass[bkey] = PassSummary(engine_calls=calls, pods=len(passes), pushed=pushed, removed=removed)
    metrics.ENGINE_CALLS.labels(namespace=ns, base=bname).set(calls)
    return PodSync(records=records, took_part={p.pod for p in passes if p.took_part},
                   digests={name: p.digest for name, p in payload.items()}, events=events)


async def unload_adapter(rt: Runtime, body: dict, base: dict | None, pods: list[S.PodView]) -> list[str]:
    """On deletion: DELETE the adapter from every engine pod of the base. Returns the pods that
    could not be reached (the caller retries a bounded number of times)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    token = await engine_token(rt, ns, base)

    async def one(p: S.PodView) -> str | None:
        try:
            await rt.engine.delete_adapter(p.ip, p.port, name, token)  # type: ignore[arg-type]
            return None
        except (EngineError, EngineUnreachable) as e:
            return f"{p.name}: {e}"
    # Not while the base's pass pushes: that pass may still hold this adapter as placed (see
    # reconcile_base). A pass after this one may still work from a snapshot taken before the
    # deletion: the uid noted in rt.sync.unloaded keeps it from pushing the adapter back.
    base_name = ((base or {}).get("metadata") or {}).get("name") or (body.get("spec") or {}).get("baseModel")
    key = Key(ns, name)
    async with rt.sync.locks[Key(ns, base_name)]:
        rt.sync.forget_unloaded(meta.get("uid"))
        rt.sync.records.pop(key, None)
        rt.placements.forget(key)
        rt.sync.manifests.pop(key, None)
        rt.sync.served.pop(key, None)
        results = await asyncio.gather(*(one(p) for p in pods if p.ip and not p.deleting))
    return [r for r in results if r]
