"""The adapter catalog: a small read-only HTTP endpoint the engines ask for adapters they were not given.

Placement keeps an adapter warm on a few pods; any pod may still get a request for it. Such a pod
asks here, with its base's admin token:

    GET /catalog/v1/{namespace}/{base}/adapters/{name}   Authorization: Bearer <admin token of base>

and gets the adapter's manifest, the very one the operator pushes to its placed pods (its own
source, revision, sha256 and tenant key HASHES, never raw keys), so that a just-in-time load
obeys the adapter's tenant rules and digest there too (engine/loraplex/engine/core/adapters/catalog_source.py).

Who may ask is decided before the API is read (catalog_auth.py): the token must be the admin
token of that very base, checked against a table each replica refreshes in the background, and
each caller (the base, or the client's address when it is not authenticated) has a token bucket.

Answers: 200 manifest JSON; 401 without a bearer token; 403 when the base is not one this operator
serves or the token is not that base's (one answer for both: base names are not confirmed to
strangers); 429 with Retry-After when the caller is past its rate; 404 when the base has no such
adapter; 409 when it exists but cannot be served (spec problem, Failed, being deleted), with the
reason; 503 with Retry-After when the API server cannot be read now (or the table was never
loaded). Errors use the engine's shape {"error": {"message", "type", "param", "code"}}.

Every replica answers, the standbys included: after the token check a lookup reads the LoraAdapter
by name from the API (one GET, cached for a few seconds; its Secrets through the runtime's cache)
and builds the manifest with the same function the reconcile pass uses; at most LOOKUPS_AT_ONCE
lookups read the API at once. Names that are no adapter are cached apart from the adapters found,
so a stream of made-up names cannot push real entries out. A standby has no kopf indexes (it
waits for the Lease), and readiness cannot route only to the leader without stalling the chart's
rolling update (maxUnavailable 0), so reading by name is what lets any replica answer. A lookup
never lists adapters: its cost does not grow with their number.

A pod that starts (a scale-up, from zero or not) asks which adapters are placed on it, to load
them before it reports Ready (the engine's warm start, docs/engine.md "Warm start"):

    GET /catalog/v1/{namespace}/{base}/placement/{pod}?limit=N   (same token, same bucket)

answers {"adapters": [manifest, ...], "placed": <how many are placed on it in all>}: hottest
first (ties, and every adapter while no rates are known, by name), at most N (default and cap
PLACEMENT_MAX), preload adapters left out (the base's ConfigMap carries them, and every pod loads
them before Ready anyway). The plan is placement.py's own (`place`) over the pods of the base's
last pass plus the asking pod, so a new pod gets what the next pass will push to it. It is made
from what this replica's Runtime holds after a pass over the base (`base_view`), off the event
loop (PLACEMENTS_AT_ONCE at a time): a replica that holds none (a standby, or the leader before
its first pass) answers 503 with Retry-After and closes the connection, so the engine's retry
may reach another replica behind the Service.

Served with aiohttp (kopf's own HTTP stack) on LORAPLEX_CATALOG_PORT (9091; 0: off), beside
/metrics on 9090. LORAPLEX_CATALOG_URL is how engines reach it (the chart's Service); the
operator renders `--adapter-catalog-url <it>/catalog/v1/<namespace>/<base>` into every engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from aiohttp import web

from loraplex.manifest import DNS1123_LABEL, AdapterManifest

from . import adapters as A
from . import constants as C
from . import placement as P
from . import revisions as V
from .catalog_auth import CallerLimits, TokenTable
from . import config
from .constants import Key
from .kube import ApiError, Ref
from .sync import desired_manifest
from .runtime import Runtime

log = logging.getLogger("loraplex.operator.catalog")

PREFIX = C.CATALOG_PREFIX
RETRY_AFTER_SECONDS = 2
CACHE_SECONDS = 2.0  # a burst of pods asking for one adapter costs one read of it
CACHE_ENTRIES = 4096
LOOKUPS_AT_ONCE = 32  # lookups reading the API at once; more wait (a cold fleet asks in bursts)
# Manifests in one placement answer: a pod warms at most what its host tier and device slots
# hold (--max-cpu-adapters 64 and 8 slots by default), and 256 manifests with a few tenant
# hashes each are ~100 kB of JSON.
PLACEMENT_MAX = 256
PLACEMENT_RETRY_SECONDS = 1
# Plans made at once, each in a worker thread (kopf's event loop goes on meanwhile): a plan is
# CPU work (a hash per adapter and pod), and a scale-up asks for many at once.
PLACEMENTS_AT_ONCE = 1
POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a DNS-1123 subdomain

Rates = Callable[[str, str], Mapping[str, float]]  # (namespace, base) -> adapter -> requests a second

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          409: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def _error(status: int, message: str, code: str, retry_after: int = RETRY_AFTER_SECONDS) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    return web.json_response({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                        "param": None, "code": code}}, status=status, headers=headers)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


@dataclass(frozen=True)
class Cached:
    """An object as read at `at` (None: it did not exist)."""

    at: float
    body: dict | None


class ObjectCache:
    """Custom resources read by name, kept CACHE_SECONDS (bounded; the oldest go first). Names
    found missing are kept in a map of their own, so that misses never evict what exists."""

    def __init__(self, ttl: float = CACHE_SECONDS, max_entries: int = CACHE_ENTRIES):
        self.ttl, self.max_entries = ttl, max_entries
        self.items: OrderedDict[Ref, Cached] = OrderedDict()
        self.missing: OrderedDict[Ref, Cached] = OrderedDict()

    async def get(self, rt: Runtime, ref: Ref) -> dict | None:
        key = ref
        now = time.monotonic()
        hit = self.items.get(key) or self.missing.get(key)
        if hit is not None and now - hit.at < self.ttl:
            return hit.body
        body = await rt.kube.get(ref)
        self.items.pop(key, None)
        self.missing.pop(key, None)
        kept = self.items if body is not None else self.missing
        kept[key] = Cached(now, body)
        while len(kept) > self.max_entries:
            kept.popitem(last=False)
        return body


async def lookup(rt: Runtime, cache: ObjectCache, namespace: str, base_name: str, name: str,
                 base: dict) -> tuple[int, Any]:
    """(HTTP status, manifest JSON or (code, message)) for a caller already authenticated as the
    engines of `base` (catalog_auth.TokenTable). The whole decision, without aiohttp."""
    if len(name) > 63 or not DNS1123_LABEL.match(name):
        return 404, ("model_not_found", f"{name[:80]!r} is not a LoraAdapter name")
    adapter = await cache.get(rt, Ref(C.API_VERSION, C.LORA_PLURAL, namespace, name))
    spec = (adapter or {}).get("spec") or {}
    if adapter is None or spec.get("baseModel") != base_name:
        return 404, ("model_not_found", f"no LoraAdapter {name!r} on base {namespace}/{base_name}")
    meta, status = adapter.get("metadata") or {}, adapter.get("status") or {}
    if meta.get("deletionTimestamp"):
        return 409, ("adapter_deleting", f"LoraAdapter {name!r} is being deleted")
    if status.get("phase") == "Failed" and status.get("observedGeneration") == meta.get("generation"):
        why = next((c.get("message") for c in status.get("conditions") or [] if c.get("type") == "Ready"), "")
        return 409, ("adapter_failed", f"LoraAdapter {name!r} is Failed: {why or 'see its status'}")
    try:
        # The same validation and manifest (tenant hashes from the API key Secrets) as a push.
        manifest = await desired_manifest(rt, namespace, name, spec, base.get("spec") or {})
    except A.SpecProblem as problem:
        return 409, (problem.reason, f"LoraAdapter {name!r} is not accepted: {problem.message}")
    # Its revisions split as on its placed pods (status.traffic), so an unplaced pod splits alike.
    return 200, A.manifest_json(V.served_from_status(manifest, spec, status))


@dataclass(frozen=True)
class BaseView:
    """One base as this replica's Runtime holds it after a pass, copied on the event loop and
    read in a worker thread: the pass's candidate pods, the accepted manifests of the namespace's
    adapters (sync.CachedManifest: each kept under the canonical spec it was built from, which
    says the adapter's base and placement), where each was placed, and the base's spec."""

    base: str
    pods: tuple[str, ...]
    built: tuple[tuple[str, Any], ...]  # (adapter name, sync.CachedManifest)
    previous: Mapping[str, list[str]]
    base_spec: Mapping


def base_view(rt: Runtime, namespace: str, base_name: str, base: dict) -> BaseView | None:
    """A copy of what the last pass over the base left in memory (cheap: no decoding), or None
    when this replica made no pass over it."""
    pods = rt.sync.pods.get(Key(namespace, base_name))
    if pods is None:
        return None
    # The served manifests (with revisions) where the pass made them, under the plain one's stamp.
    served = rt.sync.served
    built = tuple((k.name, dataclasses.replace(c, result=served[k].manifest) if k in served else c)
                  for k, c in list(rt.sync.manifests.items())
                  if k.namespace == namespace and isinstance(c.result, AdapterManifest))
    previous = {k.name: list(v) for k, v in list(rt.placements.where.items()) if k.namespace == namespace}
    return BaseView(base_name, tuple(sorted(pods)), built, previous, base.get("spec") or {})


def _wants(view: BaseView) -> tuple[list[P.Want], dict[str, AdapterManifest]]:
    """What each adapter of the base asks of placement (placement.resolve), and its manifest."""
    wants, manifests = [], {}
    for name, cached in view.built:
        try:
            spec = json.loads(cached.stamp[0])
        except (TypeError, ValueError, IndexError):
            continue
        if not isinstance(spec, dict) or spec.get("baseModel") != view.base:
            continue
        try:
            resolved = P.resolve(spec.get("placement"), view.base_spec.get("placement"), cached.result.preload)
        except A.SpecProblem:
            continue  # not placed anywhere (the pass reports it on the adapter)
        # `replicas: auto`: at the count the last pass placed it at (demand.py decides it).
        wants.append(P.want_of(name, resolved, None, len(view.previous.get(name) or []))[0])
        manifests[name] = cached.result
    return wants, manifests


def _spread_on(pod: str, want: P.Want, pods: frozenset[str], before: frozenset[str], where: list[str]) -> bool:
    """Whether `place` puts the spread adapter `want` on `pod` among `pods`, from where the last
    pass put it among `before` (the same pods, or those without `pod`): rendezvous hashing keeps
    the top n, so `pod` is in iff it outranks the weakest of them. Two hashes, not one per pod;
    when `where` is not such a top n (another spec, other pods), ranked over every pod."""
    n = P.count(want.replicas, len(pods))
    if n >= len(pods) or n == 0:
        return n > 0
    if pod in before:
        return pod in where
    if len(where) != n or not before.issuperset(where):
        return pod in P.ranked(want.name, pods)[:n]
    key = lambda q: (-P.score(want.name, q), q)  # noqa: E731 (ranked's order)
    return key(pod) < max(map(key, where))


def placed_on_pod(pod: str, view: BaseView, rates: Mapping[str, float] | None = None,
                  limit: int = PLACEMENT_MAX) -> tuple[list[AdapterManifest], int]:
    """(the manifests placed on `pod`, hottest first, at most `limit`; how many are placed on it
    in all). Pure: what placement.place gives over the view's pods plus `pod` (a pod not in the
    last pass is a new one, and gets what the next pass will give it), preload adapters left out.
    With only spread adapters that is decided per adapter from its last placement (`_spread_on`:
    10,000 adapters over 50 pods took 1.6 s as one `place`, 0.2 s so, decoding included); a
    least-loaded one depends on every other's load, and then `place` plans the whole base."""
    wants, manifests = _wants(view)
    before, pods = frozenset(view.pods), frozenset({*view.pods, pod})
    if any(w.policy == P.LEAST_LOADED and P.count(w.replicas, len(pods)) < len(pods) for w in wants):
        plan = P.place(wants, pods, {name: view.previous.get(name, []) for name in manifests})
        mine = [name for name, on in plan.items() if pod in on]
    else:
        mine = [w.name for w in wants if _spread_on(pod, w, pods, before, view.previous.get(w.name, []))]
    mine = [name for name in mine if not manifests[name].preload]
    rates = rates or {}
    mine.sort(key=lambda name: (-float(rates.get(name, 0.0)), name))
    return [manifests[name] for name in mine[:limit]], len(mine)


def _limit(request: web.Request) -> int | None:
    text = request.query.get("limit")
    if text is None:
        return PLACEMENT_MAX
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 1 <= value <= PLACEMENT_MAX else None


def authenticate(table: TokenTable, limits: CallerLimits, request: web.Request) -> web.Response | dict:
    """The base the caller's token belongs to, or the answer that refuses it. No I/O: an unknown
    base or a wrong token costs no API call. Each caller spends its own bucket (the base when
    authenticated, else the client's address)."""
    ns, base_name = request.match_info["namespace"], request.match_info["base"]
    token = _bearer(request)
    base = table.authenticate(ns, base_name, token) if token is not None else None
    wait = limits.take(f"base:{ns}/{base_name}" if base is not None else f"addr:{request.remote}")
    if wait:
        return _error(429, f"too many catalog requests; retry in {limits.retry_after(wait)} s", "rate_limited",
                      limits.retry_after(wait))
    if base is not None:
        return base
    if token is None:
        return _error(401, "send 'Authorization: Bearer <admin token of the base>'", "missing_token")
    if not table.loaded:
        return _error(503, "the operator has not read the bases' admin tokens yet", "catalog_unavailable")
    return _error(403, f"unknown base {ns[:63]}/{base_name[:253]}, or not its admin token", "forbidden")


def make_app(rt: Runtime, table: TokenTable | None = None, rates: Rates | None = None) -> web.Application:
    """The catalog's app. `rates`: per base, its adapters' request rates (the hottest are warmed
    first); none known: every adapter alike, by name."""
    cache = ObjectCache()
    limit = asyncio.Semaphore(LOOKUPS_AT_ONCE)
    planning = asyncio.Semaphore(PLACEMENTS_AT_ONCE)
    table = table if table is not None else TokenTable(config.WATCHED_NAMESPACES)
    limits = CallerLimits(rt.config.catalog_rate, rt.config.catalog_burst)

    async def get_adapter(request: web.Request) -> web.Response:
        ns, base, name = (request.match_info[k] for k in ("namespace", "base", "name"))
        caller = authenticate(table, limits, request)
        if isinstance(caller, web.Response):
            return caller
        try:
            async with limit:
                status, result = await lookup(rt, cache, ns, base, name, caller)
        except (ApiError, OSError, RuntimeError) as e:  # API server unreachable, not logged in yet
            if isinstance(e, ApiError) and e.status == 403:
                # A namespace this operator may not read (--namespace): none of its bases is there.
                return _error(403, f"unknown base {ns}/{base}, or not its admin token", "forbidden")
            log.warning("catalog lookup %s/%s/%s failed: %s", ns, base, name, e)
            return _error(503, f"the operator cannot read the API server now: {e}", "catalog_unavailable")
        if status != 200:
            return _error(status, result[1], result[0])
        return web.json_response(result)

    async def get_placement(request: web.Request) -> web.Response:
        ns, base, pod = (request.match_info[k] for k in ("namespace", "base", "pod"))
        caller = authenticate(table, limits, request)
        if isinstance(caller, web.Response):
            return caller
        if len(pod) > 253 or not POD_NAME.match(pod):
            return _error(400, f"{pod[:80]!r} is not a pod name", "invalid_pod")
        limit = _limit(request)
        if limit is None:
            return _error(400, f"limit must be an integer from 1 to {PLACEMENT_MAX}", "invalid_limit")
        async with planning:
            view = base_view(rt, ns, base, caller)
            if view is None:
                # A standby (or a leader before its first pass over the base): the next connection
                # may reach the replica that holds the placement.
                answer = _error(503, f"this operator replica has not placed the adapters of {ns}/{base} (a "
                                     "standby, or the leader before its first pass); retry", "placement_unknown",
                                PLACEMENT_RETRY_SECONDS)
                answer.force_close()
                return answer
            hot = dict((rates or _no_rates)(ns, base))
            adapters, placed = await asyncio.to_thread(placed_on_pod, pod, view, hot, limit)
        return web.json_response({"adapters": [A.manifest_json(m) for m in adapters], "placed": placed})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def refresh_tokens(app: web.Application):
        task = asyncio.get_running_loop().create_task(table.keep_fresh(rt, rt.config.catalog_refresh_interval))
        yield
        task.cancel()

    app = web.Application(client_max_size=4096)  # GETs only: no body worth reading
    app.router.add_get(PREFIX + "/{namespace}/{base}/adapters/{name}", get_adapter)
    app.router.add_get(PREFIX + "/{namespace}/{base}/placement/{pod}", get_placement)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(refresh_tokens)
    return app


def _no_rates(_namespace: str, _base: str) -> Mapping[str, float]:
    return {}


async def serve(rt: Runtime) -> web.AppRunner | None:
    """Start the catalog on LORAPLEX_CATALOG_ADDR:LORAPLEX_CATALOG_PORT (None when the port is 0)."""
    port = int(os.environ.get("LORAPLEX_CATALOG_PORT", "9091") or 0)
    if port <= 0:
        return None
    addr = os.environ.get("LORAPLEX_CATALOG_ADDR", "0.0.0.0")
    runner = web.AppRunner(make_app(rt, rates=rt.adapter_rates.of_base), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, addr, port).start()
    log.info("adapter catalog on http://%s:%d%s", addr, port, PREFIX)
    return runner
