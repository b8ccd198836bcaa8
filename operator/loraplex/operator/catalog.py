"""The adapter catalog: a small read-only HTTP endpoint the engines ask for adapters they were not given.

Placement keeps an adapter warm on a few pods; any pod may still get a request for it. Such a pod
asks here, with its base's admin token:

    GET /catalog/v1/{namespace}/{base}/adapters/{name}   Authorization: Bearer <admin token of base>

and gets the adapter's manifest, the very one the operator pushes to its placed pods (its own
source, revision, sha256 and tenant key HASHES, never raw keys), so that a just-in-time load
obeys the adapter's tenant rules and digest there too (engine/loraplex/engine/core/adapters/catalog_source.py).

Answers: 200 manifest JSON; 401 without a bearer token; 403 when the base does not exist or the
token is not that base's (one answer for both: base names are not confirmed to strangers); 404
when the base has no such adapter; 409 when it exists but cannot be served (spec problem, Failed,
being deleted), with the reason; 503 with Retry-After when the API server cannot be read now.
Errors use the engine's shape {"error": {"message", "type", "param", "code"}}.

Every replica answers, the standbys included: a lookup reads the LoraAdapter and its base by name
from the API (two GETs, cached for a few seconds; Secrets through the runtime's cache) and builds
the manifest with the same function the reconcile pass uses; at most LOOKUPS_AT_ONCE lookups
read the API at once. A standby has no kopf indexes (it
waits for the Lease), and readiness cannot route only to the leader without stalling the chart's
rolling update (maxUnavailable 0), so reading by name is what lets any replica answer. A lookup
never lists: its cost does not grow with the number of adapters.

Served with aiohttp (kopf's own HTTP stack) on LORAPLEX_CATALOG_PORT (9091; 0: off), beside
/metrics on 9090. LORAPLEX_CATALOG_URL is how engines reach it (the chart's Service); the
operator renders `--adapter-catalog-url <it>/catalog/v1/<namespace>/<base>` into every engine.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from loraplex.manifest import DNS1123_LABEL

from . import adapters as A
from . import constants as C
from .kube import ApiError, Ref
from .reconcile import desired_manifest
from .runtime import Runtime

log = logging.getLogger("loraplex.operator.catalog")

PREFIX = C.CATALOG_PREFIX
RETRY_AFTER_SECONDS = 2
CACHE_SECONDS = 2.0  # a burst of pods asking for one adapter costs one read of it
CACHE_ENTRIES = 4096
LOOKUPS_AT_ONCE = 32  # lookups reading the API at once; more wait (a cold fleet asks in bursts)

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          409: "invalid_request_error", 503: "service_unavailable"}


def _error(status: int, message: str, code: str) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return web.json_response({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                        "param": None, "code": code}}, status=status, headers=headers)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class ObjectCache:
    """Custom resources read by name, kept CACHE_SECONDS (bounded; the oldest go first)."""

    def __init__(self, ttl: float = CACHE_SECONDS, max_entries: int = CACHE_ENTRIES):
        self.ttl, self.max_entries = ttl, max_entries
        self.items: OrderedDict[tuple, tuple[float, dict | None]] = OrderedDict()

    async def get(self, rt: Runtime, ref: Ref) -> dict | None:
        key = (ref.plural, ref.namespace, ref.name)
        now = time.monotonic()
        hit = self.items.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        body = await rt.kube.get(ref)
        self.items.pop(key, None)
        self.items[key] = (now, body)
        while len(self.items) > self.max_entries:
            self.items.popitem(last=False)
        return body


async def lookup(rt: Runtime, cache: ObjectCache, namespace: str, base_name: str, name: str,
                 token: str | None) -> tuple[int, Any]:
    """(HTTP status, manifest JSON or (code, message)). The whole decision, without aiohttp."""
    if token is None:
        return 401, ("missing_token", "send 'Authorization: Bearer <admin token of the base>'")
    # Names become API paths: only what Kubernetes allows as these names goes any further.
    valid_base = DNS1123_LABEL.match(namespace) and len(namespace) <= 63 and DNS1123_SUBDOMAIN.match(base_name) \
        and len(base_name) <= 253
    base = await cache.get(rt, Ref(C.API_VERSION, C.BMD_PLURAL, namespace, base_name)) if valid_base else None
    expected = None
    if base is not None and not (base.get("metadata") or {}).get("deletionTimestamp"):
        ref = A.admin_token_ref(base.get("spec"), base_name)
        try:
            expected = A.admin_token(ref, await rt.get_secret(namespace, ref.name))
        except A.SpecProblem:
            expected = None
    if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
        return 403, ("forbidden", f"unknown base {namespace}/{base_name}, or not its admin token")
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
    return 200, A.manifest_json(manifest)


def make_app(rt: Runtime) -> web.Application:
    cache = ObjectCache()
    limit = asyncio.Semaphore(LOOKUPS_AT_ONCE)

    async def get_adapter(request: web.Request) -> web.Response:
        ns, base, name = (request.match_info[k] for k in ("namespace", "base", "name"))
        try:
            async with limit:
                status, result = await lookup(rt, cache, ns, base, name, _bearer(request))
        except (ApiError, OSError, RuntimeError) as e:  # API server unreachable, not logged in yet
            if isinstance(e, ApiError) and e.status == 403:
                # A namespace this operator may not read (--namespace): none of its bases is there.
                return _error(403, f"unknown base {ns}/{base}, or not its admin token", "forbidden")
            log.warning("catalog lookup %s/%s/%s failed: %s", ns, base, name, e)
            return _error(503, f"the operator cannot read the API server now: {e}", "catalog_unavailable")
        if status != 200:
            return _error(status, result[1], result[0])
        return web.json_response(result)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=4096)  # GETs only: no body worth reading
    app.router.add_get(PREFIX + "/{namespace}/{base}/adapters/{name}", get_adapter)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(rt: Runtime) -> web.AppRunner | None:
    """Start the catalog on LORAPLEX_CATALOG_ADDR:LORAPLEX_CATALOG_PORT (None when the port is 0)."""
    port = int(os.environ.get("LORAPLEX_CATALOG_PORT", "9091") or 0)
    if port <= 0:
        return None
    addr = os.environ.get("LORAPLEX_CATALOG_ADDR", "0.0.0.0")
    runner = web.AppRunner(make_app(rt), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, addr, port).start()
    log.info("adapter catalog on http://%s:%d%s", addr, port, PREFIX)
    return runner
